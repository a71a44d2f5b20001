"""How the ModelRunner (runtime/model_runner.py) turns one shape bucket into something to call:
one small builder per backend behind one protocol, `build(entry, kv_view, call)`, which fills
the entry the runner made (its static input buffer, its program) with what a step of the bucket
calls or replays.

  - eager: the program itself, on the padded bucket-shaped inputs (the CPU default: the twin
    of the CUDA path, carrying the tests);
  - inductor: the program compiled by Inductor for the bucket's static shapes (one compiled
    function per program variant, recompiled per bucket; Inductor's on-disk cache, under
    ~/.cache/xllm_compile/inductor, lets a second process skip the compile);
  - cpu_graph: the program (or its arena program) recorded once over the entry's static buffers
    and replayed as a flat list of kernel calls (runtime/cpu_graph.py; the CPU default);
  - cuda_graph: the program (or its arena program) captured into a CUDA graph over the entry's
    static buffers, replayed after the step's inputs are copied in; all graphs share one
    memory pool, since one runs at a time;
  - torchair: Ascend graph mode: the program compiled by torch.compile with torchair's NPU
    backend (`torchair.get_npu_backend`) for the bucket's static shapes (the npu default; never
    run on an NPU here: tested with torchair replaced at the module boundary).

The activation arena (an option of the runner, not a builder) changes what the entry's program
is (its arena program) and where its buffer lives; any builder but Inductor then applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

BACKENDS = ("cpu_graph", "cuda_graph", "eager", "inductor", "torchair")


@dataclass
class Entry:
    """One bucket's executable."""

    buffer: torch.Tensor  # int64 static buffer holding the program's seven index inputs
    # (a view of the arena's input region when the entry runs over the arena)
    args: list[torch.Tensor]  # its seven views, in trace.INPUT_NAMES order
    host: object = None  # a CPU buffer's numpy view (the padded rows are written through it)
    output: torch.Tensor | None = None  # [Bp, V] static logits (CUDA graphs)
    graph: object = None  # a torch.cuda.CUDAGraph or a cpu_graph.CpuGraph, replayed each step
    fn: object = None  # the Inductor-compiled or arena program, else None: the program itself
    program: object = None  # the program (variant) of the bucket's token count
    variant: str = "base"
    uses: int = field(default=0)
    nbytes: int = 0  # device memory this entry holds: static buffers, captured graph's memory

    @property
    def callable(self):
        """What a step of this bucket calls: the compiled or arena program, else the program."""
        return self.program if self.fn is None else self.fn


class Call(Protocol):
    def __call__(self, args: list[torch.Tensor], kv_view: torch.Tensor, fn) -> torch.Tensor: ...


class StepBuilder(Protocol):
    name: str

    def build(self, entry: Entry, kv_view: torch.Tensor, call: Call) -> None:
        """Make `entry` ready to run (compile, capture...); `call(args, kv_view, fn)` runs a
        program on the runner's weights."""


class EagerBuilder:
    name = "eager"

    def build(self, entry: Entry, kv_view: torch.Tensor, call: Call) -> None:
        return None  # the entry calls its program


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled graphs across processes (unless TORCHINDUCTOR_CACHE_DIR)."""
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", os.path.join(root, "xllm_compile", "inductor")
    )


class InductorBuilder:
    name = "inductor"

    def __init__(self, stats, num_keys: int) -> None:
        self.stats, self.num_keys = stats, num_keys
        self._compiled: dict[str, object] = {}  # variant -> torch.compile'd program

    def build(self, entry: Entry, kv_view: torch.Tensor, call: Call) -> None:
        """Inductor-compile the entry's program for the bucket's static shapes (compiled on
        this first call)."""
        inductor_cache_dir()
        if entry.variant not in self._compiled:
            self._compiled[entry.variant] = torch.compile(entry.program, dynamic=False)
        hits, misses = _inductor_counters()
        _compile_bucket(entry, kv_view, call, self._compiled[entry.variant], self.num_keys)
        new_hits, new_misses = _inductor_counters()
        self.stats.compile_cache_hits += new_hits - hits
        self.stats.compile_cache_misses += new_misses - misses


class TorchairBuilder:
    """Each bucket compiled through torchair (GE graph mode on Ascend) with static shapes."""

    name = "torchair"

    def __init__(self, num_keys: int) -> None:
        self.num_keys = num_keys
        self._compiled: dict[str, object] = {}
        self._backend = None

    def backend(self):
        if self._backend is None:
            try:
                import torchair
            except ImportError:
                from xllm_compile.errors import BackendUnavailableError

                raise BackendUnavailableError(
                    "graph cache 'torchair' needs torchair: pip install 'xllm-compile[npu]'"
                ) from None
            config = torchair.CompilerConfig()
            self._backend = torchair.get_npu_backend(compiler_config=config)
        return self._backend

    def build(self, entry: Entry, kv_view: torch.Tensor, call: Call) -> None:
        if entry.variant not in self._compiled:
            self._compiled[entry.variant] = torch.compile(
                entry.program, backend=self.backend(), dynamic=False
            )
        _compile_bucket(entry, kv_view, call, self._compiled[entry.variant], self.num_keys)


def _compile_bucket(entry: Entry, kv_view, call: Call, compiled, num_keys: int) -> None:
    """Run `compiled` (a torch.compile'd program) once on the bucket's inputs, which compiles
    its graph for these static shapes, and make it the entry's callable. One graph per bucket:
    dynamo's per-function recompile limit (8) is lifted to the number of buckets meanwhile."""
    import torch._dynamo

    limit = num_keys + 8
    with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit):
        with torch.inference_mode():
            call(entry.args, kv_view, compiled)
    entry.fn = compiled


def _inductor_counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


class CpuGraphBuilder:
    name = "cpu_graph"
    POOL_TOKENS = 8

    def build(self, entry: Entry, kv_view: torch.Tensor, call: Call) -> None:
        """Record the entry's program over its static buffers (its outputs: a replay's). A
        bucket of at most POOL_TOKENS tokens replays on the step pool: there every parallel op is
        one of the kernels' own (the dense linear's streaming kernel takes up to 8 bf16 rows;
        beyond, oneDNN's GEMM would run on one thread inside the pool's region)."""
        from xllm_compile.env import step_pool
        from xllm_compile.runtime.cpu_graph import CpuGraph

        pool = step_pool() and len(entry.args[0]) <= self.POOL_TOKENS

        def record(*args):
            entry.graph = CpuGraph.capture(entry.callable, args, pool=pool)
            return entry.graph.replay()

        call(entry.args, kv_view, record)


class CudaGraphBuilder:
    name = "cuda_graph"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()  # shared: one graph runs at a time

    def build(self, entry: Entry, kv_view: torch.Tensor, call: Call) -> None:
        reserved = torch.cuda.memory_reserved(self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the capture
                call(entry.args, kv_view, entry.callable)
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(entry.graph, pool=self.pool):
            entry.output = call(entry.args, kv_view, entry.callable)
        # the graph's private memory (shared pool: what this capture added to it)
        entry.nbytes += max(0, torch.cuda.memory_reserved(self.device) - reserved)


def make_builder(backend: str, device: torch.device, stats, num_keys: int) -> StepBuilder:
    if backend == "cuda_graph":
        return CudaGraphBuilder(device)
    if backend == "inductor":
        return InductorBuilder(stats, num_keys)
    if backend == "cpu_graph":
        return CpuGraphBuilder()
    if backend == "torchair":
        return TorchairBuilder(num_keys)
    return EagerBuilder()
