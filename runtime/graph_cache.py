"""Multi-graph cache for decode and prefill steps, keyed by parameterized dynamic shapes.

A step runs as the executable of its bucket:
  - decode (one new token for each of B sequences, the longest Lk long): ("decode", Bp, Lb), Bp
    the smallest batch bucket >= B, Lb the smallest kv-length bucket >= Lk;
  - prefill (T tokens of B sequences): ("prefill", Tp, Bp, Lb), Tp the smallest prefill token
    bucket that holds the T tokens plus one per padding sequence.
Values that vary inside a bucket (token ids, positions, slots, lengths, logits rows) are inputs
copied into the entry's static buffer, never baked in, so one executable serves every step of
its bucket:

  - CUDA: a CUDA graph captured over static input/output buffers (one memory pool shared by all
    graphs, since one runs at a time), replayed after copying the step's inputs in;
  - CPU: the program called on the padded, bucket-shaped inputs ("eager", its twin, carrying
    the tests), or compiled by Inductor for the bucket's static shapes ("inductor"); Inductor's
    on-disk graph cache (under ~/.cache/xllm_compile/inductor) lets a second process skip the
    compile.

The activation arena (on by default for CUDA graphs when the artifact holds arena plans;
`arena=True` elsewhere): one arena of pool pages (runtime/arena.py, memfd+mmap on CPU, CUDA VMM on
GPU) shared by every bucket, since one runs at a time. Its first bytes hold the static input
buffer (the largest bucket's seven index rows; each entry views its prefix), and from there each
bucket's program writes its planned intermediates and its logits at the offsets of the
artifact's plan for its shapes (arena_plans.json, planned at compile time): a CUDA graph captured
over it reads its inputs from and leaves its output in the arena. The logits of a step are valid
until the next step, as with any static output. Buckets without a plan allocate as usual.

Padding never touches a real sequence: padding rows are dummy sequences in a scratch KV slot
reserved at start, every token of them at position 0 (they read and write that slot's row 0
only, so the slot needs one row of memory whatever the padding). A decode pad is a one-token
sequence; a prefill pads with Bp - B sequences, the last one taking the remaining tokens. The KV
cache is passed cut to Lb positions (a view: same memory), which bounds the CUDA attention.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from xllm_compile.arena_plans import StoredPlan, find_plan
from xllm_compile.buckets import (
    bucket_for,
    cover,
    decode_batch_buckets,
    fit,
    kv_len_buckets,
    prefill_batch_buckets,
    prefill_token_buckets,
)
from xllm_compile.runtime.arena import Arena, build_arena_runner, make_arena
from xllm_compile.runtime.kv_cache import KVCache
from xllm_compile.runtime.step_programs import BASE, StepPrograms

__all__ = [
    "GraphCache",
    "GraphCacheStats",
    "attach_graph_cache",
    "bucket_for",
    "decode_batch_buckets",
    "kv_len_buckets",
    "prefill_token_buckets",
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
    arena_programs: int = 0  # entries built over the activation arena (the rest allocate)
    unbucketed: int = 0  # steps no bucket held (the executor ran them on the plain program)


@dataclass
class _Entry:
    buffer: torch.Tensor  # int64 static buffer holding the program's seven index inputs
    # (a view of the arena's input region when the entry runs over the arena)
    args: list[torch.Tensor]  # its seven views, in trace.INPUT_NAMES order
    output: torch.Tensor | None = None  # [Bp, V] static logits (CUDA graphs)
    graph: torch.cuda.CUDAGraph | None = None
    fn: object = None  # the Inductor-compiled or arena program, else None: the program itself
    program: object = None  # the program (variant) of the bucket's token count
    variant: str = "base"

    @property
    def callable(self):
        """What a step of this bucket calls: the compiled or arena program, else the program."""
        return self.program if self.fn is None else self.fn

    uses: int = field(default=0)
    nbytes: int = 0  # device memory this entry holds: static buffers, captured graph's memory


class GraphCache:
    def __init__(
        self,
        graph_module,
        params: list[torch.Tensor],
        kv_cache: KVCache,
        max_num_seqs: int,
        device: str | torch.device,
        backend: str | None = None,
        max_entries: int = 256,
        max_bytes: int | None = None,
        buckets: dict | None = None,
        prefill: bool | None = None,
        max_num_tokens: int | None = None,
        arena_plans: list[StoredPlan] | None = None,
        arena: bool | None = None,
        programs: StepPrograms | None = None,
    ) -> None:
        """`backend`: "cuda_graph" (the default on CUDA), "eager" (the default on CPU) or
        "inductor"; `max_entries`/`max_bytes`: how many executables, and how much memory held by
        them, are kept: past either, the least recently used are evicted first;
        `prefill`: route prefill steps through token buckets too (default: yes for CUDA graphs
        and Inductor, no for eager, where padding a prefill only adds work);
        `arena_plans`: the artifact's plans (arena_plans.loads); `arena`: run bucket programs
        over one activation arena holding the static inputs, intermediates and logits (default:
        yes for CUDA graphs when plans are given; Inductor plans its own buffers);
        `programs`: the artifact's program per step size (a --tp --overlap auto artifact's
        variants; default: `graph_module` for all), chosen per bucket by its token count."""
        self.graph_module, self.params, self.kv_cache = graph_module, params, kv_cache
        self.programs = programs or StepPrograms(graph_module)
        self.device = torch.device(device)
        self.backend = backend or ("cuda_graph" if self.device.type == "cuda" else "eager")
        if self.backend not in BACKENDS:
            raise ValueError(f"graph cache backend {self.backend!r}; choose from {BACKENDS}")
        self.use_cuda_graphs = self.backend == "cuda_graph"
        self._compiled: dict[str, object] = {}  # variant -> torch.compile'd program
        buckets = buckets or {}  # the manifest's (compile-time) choice, else the defaults
        # the compile-time buckets holding every batch up to max_num_seqs (padding rows use the
        # scratch slot, so a bucket may exceed it); their arena plans then apply as they are
        self.batch_buckets = cover(
            buckets.get("decode_batch", decode_batch_buckets(max_num_seqs)), max_num_seqs
        )
        self.kv_buckets = fit(
            buckets.get("kv_len", kv_len_buckets(kv_cache.max_len)), kv_cache.max_len
        )
        if prefill is None:
            prefill = self.backend != "eager"
        max_num_tokens = max_num_tokens or kv_cache.max_len
        self.prefill_buckets: tuple[int, ...] = ()
        if prefill:
            sizes = buckets.get("prefill_tokens", prefill_token_buckets(max_num_tokens))
            self.prefill_buckets = tuple(sorted(set(sizes)))
        # a prefill batch may need one padding sequence more than the largest decode batch
        self.prefill_batch_buckets = prefill_batch_buckets(self.batch_buckets, max_num_seqs)
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.pad_slot = kv_cache.allocate(1)  # scratch slot for padding rows, held for good
        # called with (padded int64 inputs, their 7 lengths, kv length) before each bucketed run
        self.before_run = None
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.stats = GraphCacheStats()
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self.plans = list(arena_plans or [])
        if arena is None:
            arena = self.use_cuda_graphs and bool(self.plans)
        if arena and (self.backend == "inductor" or not self.plans):
            why = "Inductor plans its own buffers" if self.plans else "no arena plans were given"
            raise ValueError(f"graph cache arena: {why}")
        self.use_arena = arena
        self.arena: Arena | None = None  # made on the first build over it
        biggest = max((*self.prefill_buckets, self.batch_buckets[-1]))
        self._input_bytes = -(-8 * (3 * biggest + 4 * self.prefill_batch_buckets[-1]) // 64) * 64

    def key_for(self, batch_size: int, max_seq_len: int) -> tuple | None:
        """The decode bucket of a step of `batch_size` sequences, or None if none holds it."""
        bp = bucket_for(batch_size, self.batch_buckets)
        lb = bucket_for(max_seq_len, self.kv_buckets)
        return None if bp is None or lb is None else ("decode", bp, lb)

    def prefill_key_for(self, num_tokens: int, batch_size: int, max_seq_len: int) -> tuple | None:
        """The prefill bucket ("prefill", Tp, Bp, Lb) of a step, or None if none holds it. Every
        padding sequence holds at least one token, and some padding sequence must exist to take
        the padding tokens: Tp >= T + (Bp - B), and Bp > B whenever Tp > T."""
        if not self.prefill_buckets:
            return None
        lb = bucket_for(max_seq_len, self.kv_buckets)
        bp = bucket_for(batch_size, self.prefill_batch_buckets)
        if lb is None or bp is None:
            return None
        tp = bucket_for(num_tokens + bp - batch_size, self.prefill_buckets)
        if tp is not None and tp > num_tokens and bp == batch_size:
            bp = bucket_for(batch_size + 1, self.prefill_batch_buckets)
            if bp is None:
                return None
            tp = bucket_for(num_tokens + bp - batch_size, self.prefill_buckets)
        return None if tp is None else ("prefill", tp, bp, lb)

    def run(self, rows: list[list[int]], kv_tensor: torch.Tensor) -> torch.Tensor | None:
        """Run a step given its seven unpadded index rows (ids, positions, token_slots,
        seq_slots, query_lens, seq_lens, logits_indices with one row per sequence); returns
        logits [B, V], or None if no bucket holds the step (the caller runs it unbucketed)."""
        num_tokens, batch = len(rows[0]), len(rows[3])
        if num_tokens == batch:
            key = self.key_for(batch, max(rows[5]))
        else:
            key = self.prefill_key_for(num_tokens, batch, max(rows[5]))
        if key is None:
            self.stats.unbucketed += 1
            return None
        entry = self._entry(key, kv_tensor)
        padded = self._pad(rows, key)
        if self.before_run is not None:  # tensor parallel: the other ranks run the same inputs
            self.before_run(padded, self._sizes(key), key[-1])
        entry.buffer.copy_(padded, non_blocking=True)
        entry.uses += 1
        self.programs.runs[entry.variant] += 1
        if entry.graph is not None:
            entry.graph.replay()
            return entry.output[:batch]
        kv_view = kv_tensor[:, :, :, : key[-1]]
        return self._call(entry.args, kv_view, entry.callable)[:batch]

    @property
    def arena_bytes(self) -> int:
        """Bytes mapped for the activation arena (shared by all entries; not evictable)."""
        return 0 if self.arena is None else self.arena.nbytes

    run_decode = run  # the name this had when only decode steps were bucketed

    def keys(self) -> list[tuple]:
        """Every bucket a step can fall in, largest first (as CUDA-graph capture wants). Prefill
        buckets pair a token count only with batches up to it and kv lengths up to the kv
        bucket of that token count (prefills here start from an empty cache)."""
        keys = [
            ("decode", b, lb)
            for b in reversed(self.batch_buckets)
            for lb in reversed(self.kv_buckets)
        ]
        for tp in reversed(self.prefill_buckets):
            top = bucket_for(tp, self.kv_buckets) or self.kv_buckets[-1]
            keys += [
                ("prefill", tp, bp, lb)
                for bp in reversed(self.prefill_batch_buckets)
                if bp <= tp
                for lb in reversed(self.kv_buckets)
                if lb <= top
            ]
        return keys

    def warmup(self, kv_tensor: torch.Tensor, show_progress: bool = False) -> None:
        """Build every bucket of keys() now."""
        from xllm_compile.progress import progress

        keys = self.keys()
        with progress(total=len(keys), desc="warm-up", unit="graph", show=show_progress) as bar:
            for key in keys:
                self._entry(key, kv_tensor)
                bar.update(1)

    def _pad(self, rows: list[list[int]], key: tuple) -> torch.Tensor:
        """The step's rows padded to the bucket, flattened into one int64 tensor."""
        ids, positions, token_slots, seq_slots, query_lens, seq_lens, logits_idx = rows
        tp, bp = self._sizes(key)[2:4]
        pad_seqs, pad_tokens = bp - len(seq_slots), tp - len(ids)
        pad_lens = [1] * pad_seqs
        if pad_seqs:
            pad_lens[-1] += pad_tokens - pad_seqs
        ends = list(accumulate(pad_lens, initial=len(ids) - 1))[1:]
        slot = self.pad_slot
        flat = (
            [*ids, *[0] * pad_tokens]
            + [*positions, *[0] * pad_tokens]
            + [*token_slots, *[slot] * pad_tokens]
            + [*seq_slots, *[slot] * pad_seqs]
            + [*query_lens, *pad_lens]
            + [*seq_lens, *[1] * pad_seqs]
            + [*logits_idx, *ends]
        )
        return torch.tensor(flat, dtype=torch.int64)

    @classmethod
    def _split(cls, buffer: torch.Tensor, key: tuple) -> list[torch.Tensor]:
        return list(buffer.split(cls._sizes(key)))

    def _call(self, args: list[torch.Tensor], kv_view: torch.Tensor, fn=None) -> torch.Tensor:
        """`fn`: the entry's compiled or arena program, else its program (variant)."""
        (logits,) = (self.graph_module if fn is None else fn)(*self.params, *args, kv_view)
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
        while len(self.entries) > 1 and (
            len(self.entries) > self.max_entries
            or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):  # least recently used goes first; the entry just built always stays
            self.entries.popitem(last=False)
            self.stats.evictions += 1
        return entry

    @property
    def nbytes(self) -> int:
        """Memory held by the cached executables (what `max_bytes` bounds)."""
        return sum(e.nbytes for e in self.entries.values())

    def _build(self, key: tuple, kv_tensor: torch.Tensor) -> _Entry:
        empty = [[] for _ in range(7)]
        padded = self._pad(empty, key)  # every row is padding
        kv_view = kv_tensor[:, :, :, : key[-1]]
        variant = self.programs.variant_for(self._sizes(key)[0])
        program = self.programs.modules[variant]
        # arena plans are made for the base program (the only one without --tp)
        arena = self.use_arena and variant == BASE
        entry = self._arena_entry(padded, key, kv_view) if arena else None
        if entry is None:
            buffer = padded.to(self.device)
            entry = _Entry(buffer=buffer, args=self._split(buffer, key), nbytes=buffer.nbytes)
        entry.program, entry.variant = program, variant
        if self.backend == "inductor":
            entry.fn = self._compile_bucket(entry.args, kv_view, variant)
        if not self.use_cuda_graphs:
            return entry
        reserved = torch.cuda.memory_reserved(self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up kernels and allocator outside the capture
                self._call(entry.args, kv_view, entry.callable)
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(entry.graph, pool=self._pool):
            entry.output = self._call(entry.args, kv_view, entry.callable)
        # the graph's private memory (shared pool: what this capture added to it)
        entry.nbytes += max(0, torch.cuda.memory_reserved(self.device) - reserved)
        return entry

    def _arena_entry(self, padded: torch.Tensor, key: tuple, kv_view) -> _Entry | None:
        """An entry whose input buffer and program live in the arena, or None when no plan
        covers the bucket's shapes (then it allocates as usual)."""
        shapes = [torch.empty(n, dtype=torch.int64, device="meta") for n in self._sizes(key)]
        plan = find_plan(self.plans, [*self.params, *shapes, kv_view])
        if plan is None:
            return None
        if self.arena is None:
            most = max(p.arena_bytes for p in self.plans)
            self.arena = make_arena(str(self.device), capacity=self._input_bytes + most)
            self.arena.fit(self._input_bytes)
        buffer = self.arena.view(0, tuple(padded.shape), torch.int64)
        buffer.copy_(padded)
        program = build_arena_runner(self.graph_module, plan, self.arena, self._input_bytes)
        self.stats.arena_programs += 1
        return _Entry(buffer=buffer, args=self._split(buffer, key), fn=program)

    @staticmethod
    def _sizes(key: tuple) -> tuple[int, ...]:
        """Lengths of the seven index inputs of bucket `key`."""
        tp, bp = (key[1], key[1]) if key[0] == "decode" else (key[1], key[2])
        return (tp, tp, tp, bp, bp, bp, bp)

    def _compile_bucket(self, args: list[torch.Tensor], kv_view: torch.Tensor, variant: str):
        """Inductor-compile the program for this bucket's static shapes (compiled on this call)."""
        import torch._dynamo

        inductor_cache_dir()
        if variant not in self._compiled:
            program = self.programs.modules[variant]
            self._compiled[variant] = torch.compile(program, dynamic=False)
        compiled = self._compiled[variant]
        hits, misses = _inductor_counters()
        # One compiled artifact per bucket: lift dynamo's per-function recompile limit (8) to the
        # number of buckets for the duration of the build.
        limit = len(self.keys()) + 8
        with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit):
            with torch.inference_mode():
                self._call(args, kv_view, compiled)
        new_hits, new_misses = _inductor_counters()
        self.stats.compile_cache_hits += new_hits - hits
        self.stats.compile_cache_misses += new_misses - misses
        return compiled


def _inductor_counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def attach_graph_cache(
    engine, warmup: bool = False, max_num_seqs: int | None = None, **kwargs
) -> GraphCache:
    """Route the engine's steps through a new GraphCache (optionally built now).
    `max_num_seqs`: the largest batch bucket (default: the engine's limit)."""
    ex = engine.executor
    cache = GraphCache(
        ex.graph_module,
        ex.params,
        engine.kv_cache,
        max_num_seqs or engine.scheduler.max_num_seqs,
        ex.device,
        **{"max_num_tokens": engine.max_num_tokens, "programs": ex.programs, **kwargs},
    )
    ex.attach_graph_cache(cache)
    if warmup:
        cache.warmup(engine.kv_cache.tensor)
    return cache
