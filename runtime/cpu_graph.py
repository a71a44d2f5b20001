"""CPU graphs: a bucket's program recorded once over its static buffers and replayed without
Python: the CPU twin of a CUDA graph (runtime/step_builders.py, backend "cpu_graph").

A decode step of a small model on the CPU spends a quarter of its time outside the kernels: the
generated `forward` runs one Python statement per node (~760 for SmolLM2) and every op call
crosses from Python into the dispatcher (~2 us each, views included). A bucket's program always
runs on the same tensors (the static input buffer, the weights, the KV cache and, over the
activation arena, the same memory for every planned result), so its op sequence can be recorded
once and run by a C++ interpreter: `torch.jit.trace` of the program on those tensors. The trace
holds the bucket's shapes as constants (a bucket's shapes are fixed) and the arena's views as
constants (the same memory every call); it is made in memory from the loaded program, never
saved or loaded (an artifact holds no TorchScript).

    graph = CpuGraph.capture(program, args)   # records it on `args` (~0.1 s for SmolLM2)
    (logits,) = graph.replay()                # the step, on whatever the buffers now hold

Measured (SmolLM2-135M Q4_1, 2 threads, decode bucket of 1, one process, alternating):
arena program 8.8 ms/step, its trace 6.4 ms, bit-identical logits.

What runs a replay: an `xllm::CpuProgram` (runtime/cpu_program.py, kernels/cpu/xllm_program.cpp)
where every node is one it takes (an op overload with fixed or earlier-result arguments: every
decode and prefill step of the model families here), one C++ loop calling the kernels as plain
functions; else the TorchScript trace. Measured against the trace on the same bucket (SmolLM2
Q4_1, decode bucket of 1, 2 threads, 100 alternating replays, Zen 3): median 8.06 against 8.33
ms, bit-identical logits. `CpuGraph.profile()` times each of its steps (tools/profile).

Valid while the captured tensors stay where they are (the runner's static buffers, the weights
and the KV pool do); outputs in the arena are overwritten by the next replay of any graph
sharing it: copy what must be kept.

Views are folded at capture (`fold_static_views`): a view of a tensor that is the same memory every
replay (an input buffer, a weight, an arena view, an `.out` op's result in the arena) is the same
view every replay, so it is made once and passed in as one more input instead of being recomputed
by an op each step (SmolLM2: 242 of the decode step's 578 ops, the qkv and gate/up splits and
their reshapes). Inputs, not trace constants: TorchScript's optimizer would constant-fold an op
whose inputs are all constants (silu_and_mul of two folded views) into its capture-time result.
An `.out` op whose result then has no reader stays live as an extra output of the trace (dead
code elimination would otherwise drop a write it cannot see read).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import fx


class CpuGraph:
    """A recorded step: `replay()` returns the program's outputs (a tuple)."""

    def __init__(
        self,
        traced,
        args: Sequence,
        num_outputs: int | None = None,
        folded: int = 0,
        program=None,
    ):
        self.traced, self.args = traced, tuple(args)
        self.program = program  # an xllm::CpuProgram (what replays), else None: the trace
        self.num_outputs = num_outputs  # the program's own outputs (None: all the trace's)
        self.folded = folded  # view ops made once at capture instead of every replay

    @classmethod
    @torch.inference_mode()
    def capture(
        cls,
        gm: fx.GraphModule,
        args: Sequence,
        fold: bool = True,
        program: bool = True,
        pool: bool = False,
    ) -> CpuGraph:
        """Record `gm` on `args`, the tensors every replay reads (its static views folded): as
        an xllm::CpuProgram where `program` and every node is one it runs, else as a trace.
        `pool`: the program replays on the step pool (runtime/cpu_program.py, to_program)."""
        from xllm_compile.runtime.cpu_program import to_program

        args, num_outputs, folded = tuple(args), None, 0
        if fold:
            gm, views, num_outputs, folded = fold_static_views(gm, args)
            args = (*args, *views)
            if program and (recorded := to_program(gm, args, pool)) is not None:
                return cls(None, args, num_outputs, folded, recorded)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings: constant shapes are the point
            traced = torch.jit.trace(gm, args, check_trace=False, strict=False)
        return cls(traced, args, num_outputs, folded)

    def replay(self) -> tuple:
        if self.program is not None:
            out = tuple(self.program.run())
        else:
            out = self.traced(*self.args)
            out = out if isinstance(out, tuple) else (out,)
        return out if self.num_outputs is None else out[: self.num_outputs]

    def profile(self, replays: int) -> list[tuple[str, float]]:
        """(op, mean seconds) of each step over `replays` replays (a program's; a trace's: [])."""
        if self.program is None or replays < 1:
            return []
        self.program.set_profile(True)
        try:
            for _ in range(replays):
                self.replay()
            seconds = self.program.step_seconds()
        finally:
            self.program.set_profile(False)
        names = self.program.step_names()
        return [(name, s / replays) for name, s in zip(names, seconds, strict=True)]


def fold_static_views(gm: fx.GraphModule, args: tuple) -> tuple[fx.GraphModule, list, int, int]:
    """A copy of `gm` whose views of static tensors are placeholders after its own, with the
    views to pass them (made here by one run of `gm` on `args`), the number of `gm`'s outputs
    and how many views were folded. Static: `args` (a replay passes the same tensors), `gm`'s
    tensor attributes, and what an op returns as an alias of a static tensor: a view (folded,
    unless it is a copy, as a reshape may be) or the written input of an `.out` or in-place op
    (kept: it computes)."""
    static: dict[fx.Node, torch.Tensor] = {}  # gm's nodes
    writes: dict[fx.Node, bool] = {}  # the aliasing ops among them: writes (else a view)

    class Record(fx.Interpreter):  # keeps only the static values, not every intermediate
        def run_node(self, n):
            value = super().run_node(n)
            if not isinstance(value, torch.Tensor):
                return value
            if n.op in ("placeholder", "get_attr"):
                static[n] = value
            elif (aliased := _aliased_input(n)) is not None and aliased[0] in static:
                source = static[aliased[0]]
                if value.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                    static[n], writes[n] = value, aliased[1]  # else a copy (some reshapes)
            return value

    Record(gm).run(*args)
    graph = copy.deepcopy(gm.graph)
    old = dict(zip(graph.nodes, gm.graph.nodes, strict=True))
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    views, writers = [], []
    for node in list(graph.nodes):
        if old[node] not in writes:
            continue
        if writes[old[node]]:  # an .out / in-place op: it stays, its result is static memory
            writers.append(node)
            continue
        with graph.inserting_after(last):
            last = graph.placeholder(f"_static_view_{len(views)}")
        last.meta = dict(node.meta)
        views.append(static[old[node]])
        node.replace_all_uses_with(last)
        graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    unread = [n for n in writers if not n.users]  # kept live: a write nothing reads in the graph
    output.args = ((*results, *unread),)
    graph.lint()
    folded = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for name in [n for n in folded._buffers if n in gm.__dict__]:
        folded.__dict__[name] = folded._buffers.pop(name)  # as `gm` held them (arena views)
    return folded, views, len(results), len(views)


def _aliased_input(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """The input node an op's single tensor result aliases (by its schema) and whether the op
    writes it, or None."""
    op = node.target
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
        return None
    schema = op._schema
    if len(schema.returns) != 1 or schema.returns[0].alias_info is None:
        return None
    sets = schema.returns[0].alias_info.before_set
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not (arg.alias_info.before_set & sets):
            continue
        positional = i < len(node.args) and not arg.kwarg_only
        given = node.args[i] if positional else node.kwargs.get(arg.name)
        return (given, arg.alias_info.is_write) if isinstance(given, fx.Node) else None
    return None
