"""Chooses what runs in each step (vLLM v1's unified schedule, nano-vllm's simplicity): one ragged
batch under a token budget (`max_num_tokens`, the server's --max-num-batched-tokens) holding

  1. every running sequence's next token (decodes first, so a long prompt never stalls them),
  2. the next chunk of each running sequence still prefilling its prompt,
  3. waiting sequences, first come first served, while slots, KV pages and the budget allow:
     each gets its first chunk (chunked prefill: a prompt longer than what is left of the
     budget is split over steps) after any prefix it can share (prefix_cache.py).

When the KV cache cannot grow a running sequence, stored prefixes are dropped first (the
cache's reclaim hook), then the newest sequence is preempted: its pages are freed and it waits
to be recomputed from its prompt and generated tokens. Pure Python, no tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from xllm_compile.runtime.kv_cache import KVCache
from xllm_compile.runtime.sequence import Sequence, Status


@dataclass
class Batch:
    seqs: list[Sequence]  # each with `num_scheduled` set: the tokens it computes this step

    @property
    def is_prefill(self) -> bool:
        """Whether some sequence computes more than one token (a prompt or a chunk of one)."""
        return any(s.num_scheduled > 1 for s in self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled for s in self.seqs)


class Scheduler:
    def __init__(
        self, kv_cache: KVCache, max_num_seqs: int, max_num_tokens: int, prefix_cache=None
    ) -> None:
        """`max_num_tokens`: the per-step token budget; `prefix_cache`: a
        prefix_cache.PrefixCache over `kv_cache`, or None (no sharing)."""
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.max_num_tokens
        batch: list[Sequence] = []
        preempted = self.num_preemptions
        decodes = [s for s in self.running if s.num_pending <= 1]
        queue = deque(decodes + [s for s in self.running if s.num_pending > 1])
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_pending, budget)
            while not self.kv_cache.grow(seq.slot, seq.num_cached + n):
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                seq.num_scheduled = n
                budget -= n
                batch.append(seq)
        if self.num_preemptions == preempted:  # memory was short this step: admit nobody
            batch += self._admit(budget)
        return Batch(batch)

    def _admit(self, budget: int) -> list[Sequence]:
        admitted = []
        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            match = shared = None
            # (a prompt's logprobs need every prompt token computed: no sharing for echo)
            if self.prefix_cache is not None and seq.params.prompt_logprobs is None:
                match = self.prefix_cache.lookup(seq)
                if match.defer:  # its prefix is being computed right now: share it next step
                    self.prefix_cache.stats.deferred += 1
                    break
                shared = self.prefix_cache.shared(match)
            cached = shared.num_tokens if shared else 0
            n = min(seq.num_tokens - cached, budget)
            extra = (shared,) if shared else ()  # a KVCache without sharing takes no prefix
            if not self.kv_cache.can_allocate(cached + n, *extra):
                break
            self.waiting.popleft()
            seq.slot = self.kv_cache.allocate(cached + n, *extra)
            seq.num_cached, seq.num_scheduled = cached, n
            seq.status = Status.RUNNING
            if self.prefix_cache is not None:
                self.prefix_cache.admitted(seq, match, shared)
            budget -= n
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def stepped(self, seqs: list[Sequence]) -> None:
        """After a step computed `seqs`' scheduled tokens: index what they completed."""
        if self.prefix_cache is not None:
            self.prefix_cache.update(seqs)

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s KV and put it first in line; its next prefill recomputes every token."""
        if self.prefix_cache is not None:
            self.prefix_cache.forget(seq)
        self.kv_cache.free(seq.slot)
        seq.slot, seq.num_cached, seq.status = -1, 0, Status.WAITING
        seq.num_scheduled = None
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if self.prefix_cache is not None:
            if reason == "error":
                self.prefix_cache.forget(seq)
            else:  # its KV stays reusable until memory is needed
                self.prefix_cache.keep(seq)
        self.kv_cache.free(seq.slot)
        seq.slot = -1
        self.running.remove(seq)
