"""Multi-graph cache for decode steps, keyed by parameterized dynamic shapes.

A decode step of B sequences whose longest context is Lk runs as the executable of its bucket
(Bp, Lb): Bp the smallest batch bucket >= B, Lb the smallest kv-length bucket >= Lk. Values that
vary inside a bucket (token ids, positions, slots, lengths) are inputs copied into the entry's
static buffers, never baked in, so one executable serves every step of its bucket:

  - CUDA: a CUDA graph captured over static input/output buffers (one memory pool shared by all
    graphs, since one runs at a time), replayed after copying the step's inputs in;
  - CPU: the program called on the padded, bucket-shaped inputs ("eager", its twin, carrying
    the tests), or compiled by Inductor for the bucket's static shapes ("inductor"); Inductor's
    on-disk graph cache (under ~/.cache/xllm_compile/inductor) lets a second process skip the
    compile.

Padding rows are dummy sequences of one token at position 0 in a scratch KV slot reserved at
start, so they never touch a real sequence's KV and never change a real token's result. The KV
cache is passed cut to Lb positions (a view: same memory), which bounds the CUDA attention gather.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from xllm_compile.buckets import bucket_for, decode_batch_buckets, fit, kv_len_buckets
from xllm_compile.runtime.kv_cache import KVCache

__all__ = [
    "GraphCache",
    "GraphCacheStats",
    "attach_graph_cache",
    "bucket_for",
    "decode_batch_buckets",
    "kv_len_buckets",
]


BACKENDS = ("cuda_graph", "eager", "inductor")


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled graphs across processes (unless TORCHINDUCTOR_CACHE_DIR)."""
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", os.path.join(root, "xllm_compile", "inductor")
    )


@dataclass
class GraphCacheStats:
    hits: int = 0
    misses: int = 0
    builds: int = 0
    build_time_s: float = 0.0
    evictions: int = 0
    compile_cache_hits: int = 0  # Inductor graphs loaded from the on-disk cache
    compile_cache_misses: int = 0  # Inductor graphs compiled from scratch


@dataclass
class _Entry:
    inputs: torch.Tensor  # [7, Bp] int64 static buffer: the program's seven index inputs
    output: torch.Tensor | None = None  # [Bp, V] static logits (CUDA graphs)
    graph: torch.cuda.CUDAGraph | None = None
    fn: object = None  # the compiled program (Inductor), else None: the program itself
    uses: int = field(default=0)


class GraphCache:
    def __init__(
        self,
        graph_module,
        params: list[torch.Tensor],
        kv_cache: KVCache,
        max_num_seqs: int,
        device: str | torch.device,
        backend: str | None = None,
        max_entries: int = 64,
        buckets: dict | None = None,
    ) -> None:
        """`backend`: "cuda_graph" (the default on CUDA), "eager" (the default on CPU) or
        "inductor"; `max_entries`: executables kept, the least recently used evicted first."""
        self.graph_module, self.params, self.kv_cache = graph_module, params, kv_cache
        self.device = torch.device(device)
        self.backend = backend or ("cuda_graph" if self.device.type == "cuda" else "eager")
        if self.backend not in BACKENDS:
            raise ValueError(f"graph cache backend {self.backend!r}; choose from {BACKENDS}")
        self.use_cuda_graphs = self.backend == "cuda_graph"
        self._compiled = None
        buckets = buckets or {}  # the manifest's (compile-time) choice, else the defaults
        self.batch_buckets = fit(
            buckets.get("decode_batch", decode_batch_buckets(max_num_seqs)), max_num_seqs
        )
        self.kv_buckets = fit(
            buckets.get("kv_len", kv_len_buckets(kv_cache.max_len)), kv_cache.max_len
        )
        self.max_entries = max_entries
        self.pad_slot = kv_cache.allocate(1)  # scratch slot for padding rows, held for good
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.stats = GraphCacheStats()
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None

    def key_for(self, batch_size: int, max_seq_len: int) -> tuple | None:
        bp = bucket_for(batch_size, self.batch_buckets)
        lb = bucket_for(max_seq_len, self.kv_buckets)
        return None if bp is None or lb is None else ("decode", bp, lb)

    def run_decode(self, rows: list[list[int]], kv_tensor: torch.Tensor) -> torch.Tensor | None:
        """Run a decode step given its seven unpadded index rows (ids, positions, token_slots,
        seq_slots, query_lens, seq_lens, logits_indices); logits [B, V], or None if no bucket."""
        batch = len(rows[0])
        key = self.key_for(batch, max(rows[5]))
        if key is None:
            return None
        entry = self._entry(key, kv_tensor)
        padded = self._pad(rows, key[1])
        entry.inputs.copy_(padded, non_blocking=True)
        entry.uses += 1
        if entry.graph is not None:
            entry.graph.replay()
            return entry.output[:batch]
        return self._call(entry.inputs, kv_tensor[:, :, :, : key[2]], entry.fn)[:batch]

    def warmup(self, kv_tensor: torch.Tensor, show_progress: bool = False) -> None:
        """Build every (batch, kv-length) bucket now, largest first (as capture wants)."""
        from xllm_compile.progress import progress

        keys = [
            ("decode", b, lb)
            for b in reversed(self.batch_buckets)
            for lb in reversed(self.kv_buckets)
        ]
        with progress(total=len(keys), desc="warm-up", unit="graph", show=show_progress) as bar:
            for key in keys:
                self._entry(key, kv_tensor)
                bar.update(1)

    def _pad(self, rows: list[list[int]], bp: int) -> torch.Tensor:
        pad = bp - len(rows[0])
        # ids, positions, token_slots, seq_slots, query_lens, seq_lens, logits_indices
        fill = (0, 0, self.pad_slot, self.pad_slot, 1, 1, None)
        out = []
        for row, value in zip(rows, fill, strict=True):
            out.append(row + (list(range(len(row), bp)) if value is None else [value] * pad))
        return torch.tensor(out, dtype=torch.int64)

    def _call(self, inputs: torch.Tensor, kv_view: torch.Tensor, fn=None) -> torch.Tensor:
        (logits,) = (self.graph_module if fn is None else fn)(
            *self.params, *inputs.unbind(0), kv_view
        )
        return logits

    def _entry(self, key: tuple, kv_tensor: torch.Tensor) -> _Entry:
        entry = self.entries.get(key)
        if entry is not None:
            self.stats.hits += 1
            self.entries.move_to_end(key)
            return entry
        self.stats.misses += 1
        start = time.perf_counter()
        entry = self._build(key, kv_tensor)
        self.stats.builds += 1
        self.stats.build_time_s += time.perf_counter() - start
        self.entries[key] = entry
        while len(self.entries) > self.max_entries:  # least recently used goes first
            self.entries.popitem(last=False)
            self.stats.evictions += 1
        return entry

    def _build(self, key: tuple, kv_tensor: torch.Tensor) -> _Entry:
        _, bp, lb = key
        inputs = self._pad([[] for _ in range(7)], bp).to(self.device)  # all rows are padding
        entry = _Entry(inputs=inputs)
        kv_view = kv_tensor[:, :, :, :lb]
        if self.backend == "inductor":
            entry.fn = self._compile_bucket(inputs, kv_view)
        if not self.use_cuda_graphs:
            return entry
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the capture
                self._call(inputs, kv_view)
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(entry.graph, pool=self._pool):
            entry.output = self._call(inputs, kv_view)
        return entry

    def _compile_bucket(self, inputs: torch.Tensor, kv_view: torch.Tensor):
        """Inductor-compile the program for this bucket's static shapes (compiled on this call)."""
        import torch._dynamo

        inductor_cache_dir()
        if self._compiled is None:
            self._compiled = torch.compile(self.graph_module, dynamic=False)
        hits, misses = _inductor_counters()
        # One compiled artifact per bucket: lift dynamo's per-function recompile limit (8) to the
        # number of buckets for the duration of the build.
        limit = len(self.batch_buckets) * len(self.kv_buckets) + 8
        with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit):
            with torch.inference_mode():
                self._call(inputs, kv_view, self._compiled)
        new_hits, new_misses = _inductor_counters()
        self.stats.compile_cache_hits += new_hits - hits
        self.stats.compile_cache_misses += new_misses - misses
        return self._compiled


def _inductor_counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def attach_graph_cache(
    engine, warmup: bool = False, max_num_seqs: int | None = None, **kwargs
) -> GraphCache:
    """Route the engine's decode steps through a new GraphCache (optionally built now).
    `max_num_seqs`: the largest batch bucket (default: the engine's limit)."""
    ex = engine.executor
    cache = GraphCache(
        ex.graph_module,
        ex.params,
        engine.kv_cache,
        max_num_seqs or engine.scheduler.max_num_seqs,
        ex.device,
        **kwargs,
    )
    ex.graph_cache = cache
    if warmup:
        cache.warmup(engine.kv_cache.tensor)
    return cache
