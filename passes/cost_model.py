"""The cost model of the communication passes: what a step of a tensor-parallel program costs,
from per-node compute times measured on the target and per-collective times from a measured
all-reduce profile (xllm_compile/comm_profile.py), replayed over the program's node order.

    compute: one resource; every node but the collectives runs on it in graph order
    comm:    one resource (gloo: its own thread; NCCL: its stream); an all-reduce starts when it
             is issued and the previous collective is done, and takes the profile's time for
             its bytes
    wait:    the compute resource stalls until its collective is done
    overlap: what share of the time both resources are busy is really parallel (measured:
             gloo's thread needs a core of its own, which a 2-core machine running 2 ranks
             lacks); the rest counts as serial

Ranks run the same program on the same shapes, so one rank's replay is the step. Two numbers
per program and step size: `predicted_s` (the replay) and `comm_s` (the collectives' own time);
`exposed_s` = predicted - compute is the time the compute waits for collectives: the
communication the schedule did not hide.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

c10d = torch.ops._c10d_functional
ISSUE = frozenset({c10d.all_reduce.default})
WAIT = c10d.wait_tensor.default


@dataclass(frozen=True)
class StepCost:
    predicted_s: float
    compute_s: float
    comm_s: float

    @property
    def exposed_s(self) -> float:
        return max(0.0, self.predicted_s - self.compute_s)

    def to_dict(self) -> dict:
        return {
            "predicted_ms": round(self.predicted_s * 1e3, 4),
            "compute_ms": round(self.compute_s * 1e3, 4),
            "comm_ms": round(self.comm_s * 1e3, 4),
            "exposed_comm_ms": round(self.exposed_s * 1e3, 4),
        }


class _Timer(fx.Interpreter):
    """Runs the graph node by node, adding each node's wall time to `times[name]`."""

    def __init__(self, gm: fx.GraphModule, times: dict) -> None:
        super().__init__(gm)
        self.times = times

    def run_node(self, n: fx.Node):
        start = time.perf_counter()
        out = super().run_node(n)
        self.times[n.name].append(time.perf_counter() - start)
        return out


@torch.inference_mode()
def node_times(
    gm: fx.GraphModule, args: Sequence, reps: int = 3, warmup: bool = True
) -> dict[str, float]:
    """Each node's compute time (the best of `reps` runs after one warm-up), by node name. On a
    one-rank group a collective is the identity: its own time here is only its launch."""
    samples: dict[str, list[float]] = defaultdict(list)
    if warmup:
        _Timer(gm, defaultdict(list)).run(*args)  # kernels, allocator
    for _ in range(reps):
        _Timer(gm, samples).run(*args)
    return {name: min(ts) for name, ts in samples.items()}


def replay(
    graph: fx.Graph,
    times: dict[str, float],
    sizes: dict[str, int],
    all_reduce_s: Callable[[int], float],
    overlap: float = 1.0,
) -> StepCost:
    """The step time of `graph` in its node order (module docstring): `times` by node name,
    `sizes` the bytes of each collective. `overlap`: the share of the communication that runs
    under compute which compute actually hides on the machine (comm_profile's measure): the
    step is then serial - overlap * (serial - ideal), ideal the two-resource replay."""
    clock = comm_free = compute = comm = 0.0
    done: dict[fx.Node, float] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        own = times.get(node.name, 0.0)
        if node.target != WAIT:  # a wait's own call is part of the stall
            compute += own
        if node.target in ISSUE:
            clock += own  # the launch
            cost = all_reduce_s(sizes.get(node.name, 0))
            done[node] = comm_free = max(clock, comm_free) + cost
            comm += cost
        elif node.target == WAIT:
            clock = max(clock + own, done.get(node.args[0], 0.0))
        else:
            clock += own
    serial = compute + comm + sum(times.get(n.name, 0.0) for n in graph.nodes if n.target == WAIT)
    predicted = serial - overlap * max(0.0, serial - clock)
    return StepCost(predicted_s=predicted, compute_s=compute, comm_s=comm)


def concrete_bytes(graph: fx.Graph, args: Sequence) -> dict[str, int]:
    """Bytes of each collective's input when the graph runs on `args`."""
    out: dict[str, int] = {}

    class _Bytes(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op == "call_function" and n.target in ISSUE:
                out[n.name] = result.numel() * result.element_size()
            return result

    with torch.inference_mode():
        _Bytes(graph.owning_module).run(*args)
    return out


def step_cost(
    gm: fx.GraphModule,
    args: Sequence,
    all_reduce_s: Callable[[int], float],
    reps: int = 3,
    overlap: float = 1.0,
) -> StepCost:
    """Measure `gm`'s nodes on `args`, then replay them with the collectives' real sizes (the
    sizing run is the warm-up)."""
    sizes = concrete_bytes(gm.graph, args)
    times = node_times(gm, args, reps, warmup=False)
    return replay(gm.graph, times, sizes, all_reduce_s, overlap)
