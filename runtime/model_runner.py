"""The ModelRunner: one step path for every backend and every rank. It owns the artifact's
program(s) (StepPrograms: one per overlap variant of a --tp artifact), the weights bound once,
and, with shape buckets enabled (the multi-graph cache), the static input buffers, the scratch
KV slot for padding, the entries and their stats. It turns a batch of sequences into the
program's flat ragged inputs and returns logits for the last token of each sequence (or every
token); it never writes the sequences' bookkeeping (the engine marks tokens cached).

Buckets, keyed by parameterized dynamic shapes (xllm_compile/buckets.py holds the arithmetic):
  - decode (one new token for each of B sequences, the longest Lk long): ("decode", Bp, Lb), Bp
    the smallest batch bucket >= B, Lb the smallest kv-length bucket >= Lk;
  - prefill (T tokens of B sequences): ("prefill", Tp, Bp, Lb), Tp the smallest prefill token
    bucket that holds the T tokens plus one per padding sequence.
Values that vary inside a bucket (token ids, positions, slots, lengths, logits rows) are inputs
copied into the entry's static buffer, never baked in, so one executable serves every step of
its bucket. What an entry runs is its builder's (runtime/step_builders.py: eager, Inductor, CUDA
graph). A step no bucket holds (or one asking for every token's logits) runs the program
directly, and is counted (`stats.unbucketed`).

The activation arena (on by default for CUDA graphs when the artifact holds arena plans;
`arena=True` elsewhere): one arena of pool pages (runtime/arena.py, memfd+mmap on CPU, CUDA VMM on
GPU) shared by every bucket, since one runs at a time. Its first bytes hold the static input
buffer (the largest bucket's seven index rows; each entry views its prefix), and from there each
bucket's program writes its planned intermediates and its logits at the offsets of the
artifact's plan for its shapes (arena_plans.json, planned at compile time): a CUDA graph captured
over it reads its inputs from and leaves its output in the arena. The logits of a step are valid
until the next step, as with any static output. Buckets without a plan allocate as usual.

Padding never touches a real sequence: padding rows are dummy sequences in a scratch KV slot
reserved when buckets are enabled, every token of them at position 0 (they read and write that
slot's row 0 only). The KV cache is passed cut to Lb positions (a view: same memory), which
bounds the CUDA attention.

Tensor parallel (attach_tp): every step, bucketed or not, is first sent to the group's other
ranks (the padded flat inputs and the kv length of the bucket), which run their own program of
the same variant on their own cache; the same path with N = 1 is the single process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from xllm_compile import buckets as B
from xllm_compile.arena_plans import StoredPlan, find_plan
from xllm_compile.runtime.arena import Arena, build_arena_runner, make_arena
from xllm_compile.runtime.kv_cache import KVCache
from xllm_compile.runtime.sequence import Sequence
from xllm_compile.runtime.step_builders import BACKENDS, Entry, make_builder
from xllm_compile.runtime.step_programs import BASE, StepPrograms


@dataclass
class RunnerStats:
    hits: int = 0
    misses: int = 0
    builds: int = 0
    build_time_s: float = 0.0
    evictions: int = 0
    compile_cache_hits: int = 0  # Inductor graphs loaded from the on-disk cache
    compile_cache_misses: int = 0  # Inductor graphs compiled from scratch
    arena_programs: int = 0  # entries built over the activation arena (the rest allocate)
    unbucketed: int = 0  # steps no bucket held (run on the plain program)


def step_rows(seqs: list[Sequence], all_logits: bool = False) -> list[list[int]]:
    """The program's index inputs for one step, as host lists, in trace.INPUT_NAMES order:
    input_ids, positions, token_slots [T]; seq_slots, query_lens, seq_lens [B];
    logits_indices [N] (the last token of each sequence, or every token)."""
    ids, positions, token_slots, query_lens, seq_lens = [], [], [], [], []
    for seq in seqs:
        pending = seq.step_ids()
        ids += pending
        positions += range(seq.num_cached, seq.num_cached + len(pending))
        token_slots += [seq.slot] * len(pending)
        query_lens.append(len(pending))
        seq_lens.append(seq.num_cached + len(pending))
    ends, end = [], -1
    for n in query_lens:
        end += n
        ends.append(end)
    logits_indices = list(range(len(ids))) if all_logits else ends
    seq_slots = [s.slot for s in seqs]
    return [ids, positions, token_slots, seq_slots, query_lens, seq_lens, logits_indices]


class ModelRunner:
    def __init__(
        self,
        programs: StepPrograms | torch.fx.GraphModule,
        params: list[torch.Tensor],
        device,
        kv_cache: KVCache | None = None,
    ) -> None:
        """`programs`: the program of each step size (a StepPrograms, or one program for all);
        `kv_cache`: the cache whose slot `enable_buckets` takes for padding."""
        if not isinstance(programs, StepPrograms):
            programs = StepPrograms(programs)
        self.programs, self.params = programs, params
        self.device = torch.device(device)
        self.kv_cache = kv_cache
        self.stats = RunnerStats()
        self.bucketed = False
        self.tp_group = None  # a runtime.tp_group.TPGroup: every step goes to ranks 1..N-1 too
        self.kv_journal = None  # with tp_group: rank 0's JournaledKVCache
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.arena: Arena | None = None
        self.use_arena = False
        self.plans: list[StoredPlan] = []
        self.prefill_buckets: tuple[int, ...] = ()

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The base program (every step's, unless an overlap variant's table says otherwise)."""
        return self.programs.base

    step_rows = staticmethod(step_rows)

    # -- shape buckets (the multi-graph cache) --

    def enable_buckets(
        self,
        max_num_seqs: int,
        backend: str | None = None,
        max_entries: int = 256,
        max_bytes: int | None = None,
        buckets: dict | None = None,
        prefill: bool | None = None,
        max_num_tokens: int | None = None,
        arena_plans: list[StoredPlan] | None = None,
        arena: bool | None = None,
    ) -> ModelRunner:
        """Route steps through shape buckets. `backend`: "cuda_graph" (the default on CUDA),
        "cpu_graph" (the default on CPU), "eager" or "inductor"; `max_entries`/`max_bytes`: how many
        executables, and how much memory held by them, are kept: past either, the least
        recently used are evicted first; `buckets`: the manifest's (compile-time) choice, else
        the defaults; `prefill`: bucket prefill steps too (default: yes for CUDA graphs and
        Inductor, no for eager, where padding a prefill only adds work); `arena_plans`: the
        artifact's plans (arena_plans.loads); `arena`: run bucket programs over one activation
        arena (default: yes for CUDA graphs when plans are given; Inductor plans its own).
        Enabling again starts a new cache: no entries, fresh counters."""
        self.entries.clear()
        self.stats, self.arena, self.prefill_buckets = RunnerStats(), None, ()
        defaults = {"cuda": "cuda_graph", "npu": "torchair"}
        self.backend = backend or defaults.get(self.device.type, "cpu_graph")
        if self.backend not in BACKENDS:
            raise ValueError(f"graph cache backend {self.backend!r}; choose from {BACKENDS}")
        self.use_cuda_graphs = self.backend == "cuda_graph"
        kv_cache, buckets = self.kv_cache, buckets or {}
        # the compile-time buckets holding every batch up to max_num_seqs (padding rows use the
        # scratch slot, so a bucket may exceed it); their arena plans then apply as they are
        self.batch_buckets = B.cover(
            buckets.get("decode_batch", B.decode_batch_buckets(max_num_seqs)), max_num_seqs
        )
        self.kv_buckets = B.fit(
            buckets.get("kv_len", B.kv_len_buckets(kv_cache.max_len)), kv_cache.max_len
        )
        if prefill is None:
            # padding a prefill to its bucket adds work; compiling it (Inductor) or capturing
            # it (CUDA graphs) pays for that; on the CPU the kernels dominate a prefill
            prefill = self.backend not in ("eager", "cpu_graph")
        max_num_tokens = max_num_tokens or kv_cache.max_len
        if prefill:
            sizes = buckets.get("prefill_tokens", B.prefill_token_buckets(max_num_tokens))
            self.prefill_buckets = tuple(sorted(set(sizes)))
        # a prefill batch may need one padding sequence more than the largest decode batch
        self.prefill_batch_buckets = B.prefill_batch_buckets(self.batch_buckets, max_num_seqs)
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.pad_slot = kv_cache.allocate(1)  # scratch slot for padding rows, held for good
        self.plans = list(arena_plans or [])
        if arena is None:
            arena = self.backend in ("cuda_graph", "cpu_graph") and bool(self.plans)
        if arena and (self.backend == "inductor" or not self.plans):
            why = "Inductor plans its own buffers" if self.plans else "no arena plans were given"
            raise ValueError(f"graph cache arena: {why}")
        self.use_arena = arena
        biggest = max((*self.prefill_buckets, self.batch_buckets[-1]))
        self._input_bytes = -(-8 * (3 * biggest + 4 * self.prefill_batch_buckets[-1]) // 64) * 64
        self.builder = make_builder(self.backend, self.device, self.stats, len(self.keys()))
        self.bucketed = True
        return self

    def key_for(self, batch_size: int, max_seq_len: int) -> tuple | None:
        """The decode bucket of a step of `batch_size` sequences, or None if none holds it."""
        return B.decode_key(batch_size, max_seq_len, self.batch_buckets, self.kv_buckets)

    def prefill_key_for(self, num_tokens: int, batch_size: int, max_seq_len: int) -> tuple | None:
        """The prefill bucket ("prefill", Tp, Bp, Lb) of a step, or None if none holds it."""
        return B.prefill_key(
            num_tokens,
            batch_size,
            max_seq_len,
            self.prefill_buckets,
            self.prefill_batch_buckets,
            self.kv_buckets,
        )

    def keys(self) -> list[tuple]:
        """Every bucket a step can fall in, largest first (as CUDA-graph capture wants)."""
        return B.all_keys(
            self.batch_buckets, self.kv_buckets, self.prefill_buckets, self.prefill_batch_buckets
        )

    def warmup(self, kv_tensor: torch.Tensor, show_progress: bool = False) -> None:
        """Build every bucket of keys() now (a no-op without buckets)."""
        from xllm_compile.progress import progress

        keys = self.keys() if self.bucketed else []
        with progress(total=len(keys), desc="warm-up", unit="graph", show=show_progress) as bar:
            for key in keys:
                self._entry(key, kv_tensor)
                bar.update(1)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached executables (what `max_bytes` bounds)."""
        return sum(e.nbytes for e in self.entries.values())

    @property
    def arena_bytes(self) -> int:
        """Bytes mapped for the activation arena (shared by all entries; not evictable)."""
        return 0 if self.arena is None else self.arena.nbytes

    # -- steps --

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], kv_cache: torch.Tensor, all_logits: bool = False):
        """Logits [N, V] of one step of `seqs` (their pending tokens). Marks nothing: the
        caller (the engine) records the tokens as cached once the step succeeded."""
        rows = step_rows(seqs, all_logits)
        if self.tp_group is None:
            return self.run_rows(rows, kv_cache, all_logits)
        with self.tp_group.watch():  # the same step on every rank, bounded by the watchdog
            return self.run_rows(rows, kv_cache, all_logits)

    def run_rows(self, rows: list[list[int]], kv_tensor: torch.Tensor, all_logits: bool = False):
        """A step given its seven unpadded index rows: through its bucket when one holds it,
        else on the plain program."""
        if self.bucketed and not all_logits:
            logits = self._run_bucketed(rows, kv_tensor)
            if logits is not None:
                return logits
        if self.tp_group is not None:
            self._send([x for row in rows for x in row], [len(r) for r in rows], 0)
        inputs = [torch.tensor(r, dtype=torch.int64, device=self.device) for r in rows]
        return self.run_inputs(inputs, kv_tensor)

    run_decode = run_rows  # the name this had when only decode steps were bucketed

    def run_inputs(self, inputs: list[torch.Tensor], kv_view: torch.Tensor) -> torch.Tensor:
        """The program of this many tokens on ready index tensors (unbucketed steps, and the
        steps a tensor-parallel worker rank receives, already padded by rank 0)."""
        (logits,) = self.programs.for_tokens(len(inputs[0]))(*self.params, *inputs, kv_view)
        return logits

    def _run_bucketed(self, rows: list[list[int]], kv_tensor: torch.Tensor):
        num_tokens, batch = len(rows[0]), len(rows[3])
        if num_tokens == batch:
            key = self.key_for(batch, max(rows[5]))
        else:
            key = self.prefill_key_for(num_tokens, batch, max(rows[5]))
        if key is None:
            self.stats.unbucketed += 1
            return None
        entry = self._entry(key, kv_tensor)
        flat = B.pad_rows(rows, key, self.pad_slot)
        if self.tp_group is None and entry.host is not None:
            # a CPU buffer takes the list straight through its numpy view: after a replay that
            # streamed the weights through the caches, each torch call here cost ~40 us cold
            entry.host[:] = flat
        else:
            padded = torch.tensor(flat, dtype=torch.int64)
            if self.tp_group is not None:  # the other ranks run the same padded inputs
                self._send(padded, B.key_sizes(key), key[-1])
            entry.buffer.copy_(padded, non_blocking=True)
        entry.uses += 1
        self.programs.runs[entry.variant] += 1
        if entry.graph is not None:
            outputs = entry.graph.replay()  # a CUDA graph leaves them in entry.output
            logits = outputs[0] if entry.output is None else entry.output
        else:
            logits = self._call(entry.args, kv_tensor[:, :, :, : key[-1]], entry.callable)
        return logits if logits.shape[0] == batch else logits[:batch]

    def _call(self, args: list[torch.Tensor], kv_view: torch.Tensor, fn) -> torch.Tensor:
        (logits,) = fn(*self.params, *args, kv_view)
        return logits

    def _entry(self, key: tuple, kv_tensor: torch.Tensor) -> Entry:
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

    def _build(self, key: tuple, kv_tensor: torch.Tensor) -> Entry:
        padded = torch.tensor(B.pad_rows([[] for _ in range(7)], key, self.pad_slot))
        kv_view = kv_tensor[:, :, :, : key[-1]]
        variant = self.programs.variant_for(B.key_sizes(key)[0])
        program = self.programs.modules[variant]
        # arena plans are made for the base program (the only one without --tp)
        use_arena = self.use_arena and variant == BASE
        entry = self._arena_entry(padded, key, kv_view) if use_arena else None
        if entry is None:
            buffer = padded.to(self.device)
            args = list(buffer.split(B.key_sizes(key)))
            entry = Entry(buffer=buffer, args=args, nbytes=buffer.nbytes)
        entry.program, entry.variant = program, variant
        if entry.buffer.device.type == "cpu":
            entry.host = entry.buffer.numpy()  # shares the buffer's memory
        self.builder.build(entry, kv_view, self._call)
        return entry

    def _arena_entry(self, padded: torch.Tensor, key: tuple, kv_view) -> Entry | None:
        """An entry whose input buffer and program live in the arena, or None when no plan
        covers the bucket's shapes (then it allocates as usual)."""
        sizes = B.key_sizes(key)
        shapes = [torch.empty(n, dtype=torch.int64, device="meta") for n in sizes]
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
        return Entry(buffer=buffer, args=list(buffer.split(sizes)), fn=program)

    # -- tensor parallel --

    def attach_tp(self, group, journal) -> None:
        """Send every step (bucketed or not) to the group's other ranks first, with the KV
        journal of rank 0's cache (runtime/tp_group.py)."""
        self.tp_group, self.kv_journal = group, journal

    def _send(self, flat, sizes, kv_len: int) -> None:
        self.tp_group.step(flat, list(sizes), kv_len, self.kv_journal.take_journal())

    @property
    def is_healthy(self) -> bool:
        return self.tp_group is None or self.tp_group.healthy

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel group (a no-op otherwise)."""
        if self.tp_group is not None:
            self.tp_group.close()


def attach_graph_cache(
    engine, warmup: bool = False, max_num_seqs: int | None = None, **kwargs
) -> ModelRunner:
    """Enable shape buckets on the engine's runner (optionally built now); returns the runner.
    `max_num_seqs`: the largest batch bucket (default: the engine's limit)."""
    runner = engine.runner
    runner.enable_buckets(
        max_num_seqs or engine.scheduler.max_num_seqs,
        **{"max_num_tokens": engine.max_num_tokens, **kwargs},
    )
    if warmup:
        runner.warmup(engine.kv_cache.tensor)
    return runner
