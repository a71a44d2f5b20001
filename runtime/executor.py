"""Runs the artifact's program: binds its weights once, then turns a batch of sequences into the
program's flat ragged inputs and returns logits for the last token of each sequence. Steps go
through the graph cache when one is attached (one executable per shape bucket); a step no bucket
holds, or one asking for every token's logits, runs the program directly."""

from __future__ import annotations

import torch

from xllm_compile.runtime.sequence import Sequence
from xllm_compile.runtime.step_programs import StepPrograms


class Executor:
    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        params: list[torch.Tensor],
        device,
        programs: StepPrograms | None = None,
    ):
        """`programs`: the program of each step size (StepPrograms; default: `graph_module`
        for every step)."""
        self.graph_module = graph_module
        self.programs = programs or StepPrograms(graph_module)
        self.params = params
        self.device = torch.device(device)
        self.graph_cache = None  # a runtime.graph_cache.GraphCache, attached by the loader
        self.tp_group = None  # a runtime.tp_group.TPGroup: every step goes to ranks 1..N-1 too
        self.kv_journal = None  # with tp_group: rank 0's JournaledKVCache

    @staticmethod
    def step_rows(seqs: list[Sequence], all_logits: bool = False) -> list[list[int]]:
        """The program's index inputs for one step, as host lists, in trace.INPUT_NAMES order:
        input_ids, positions, token_slots [T]; seq_slots, query_lens, seq_lens [B];
        logits_indices [N] (the last token of each sequence, or every token)."""
        ids, positions, token_slots, query_lens, seq_lens = [], [], [], [], []
        for seq in seqs:
            pending = seq.pending_ids()
            ids += pending
            positions += range(seq.num_cached, seq.num_cached + len(pending))
            token_slots += [seq.slot] * len(pending)
            query_lens.append(len(pending))
            seq_lens.append(seq.num_cached + len(pending))
        ends = torch.tensor(query_lens).cumsum(0).sub(1).tolist()
        logits_indices = list(range(len(ids))) if all_logits else ends
        seq_slots = [s.slot for s in seqs]
        return [ids, positions, token_slots, seq_slots, query_lens, seq_lens, logits_indices]

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], kv_cache: torch.Tensor, all_logits: bool = False):
        """Run one step and mark the pending tokens as cached. Returns logits [N, V]."""
        rows = self.step_rows(seqs, all_logits)
        if self.tp_group is None:
            logits = self._run(rows, kv_cache, all_logits)
        else:  # the same step on every rank, bounded by the group's watchdog
            with self.tp_group.watch():
                logits = self._run(rows, kv_cache, all_logits)
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return logits

    def _run(self, rows: list[list[int]], kv_cache: torch.Tensor, all_logits: bool):
        logits = None
        if self.graph_cache is not None and not all_logits:
            logits = self.graph_cache.run(rows, kv_cache)  # tensor parallel: via _send_padded
        if logits is None:
            if self.tp_group is not None:
                flat = [x for row in rows for x in row]
                self._send_padded(flat, [len(r) for r in rows], 0)
            inputs = [torch.tensor(r, dtype=torch.int64, device=self.device) for r in rows]
            program = self.programs.for_tokens(len(rows[0]))
            (logits,) = program(*self.params, *inputs, kv_cache)
        return logits

    def attach_tp(self, group, journal) -> None:
        """Broadcast every step (bucketed or not) to the group's other ranks, with the KV
        journal of rank 0's cache (runtime/tp_group.py)."""
        self.tp_group, self.kv_journal = group, journal

    def attach_graph_cache(self, cache) -> None:
        self.graph_cache = cache
        if self.tp_group is not None:
            cache.before_run = self._send_padded

    def _send_padded(self, flat, sizes: list[int], kv_len: int) -> None:
        self.tp_group.step(flat, sizes, kv_len, self.kv_journal.take_journal())

    @property
    def is_healthy(self) -> bool:
        return self.tp_group is None or self.tp_group.healthy

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel group (a no-op otherwise)."""
        if self.tp_group is not None:
            self.tp_group.close()
