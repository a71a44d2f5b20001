"""Chooses what runs in each step, nano-vllm style: admit waiting sequences for prefill while slots,
KV pages and the token budget allow, otherwise decode every running sequence. When the KV cache
cannot grow a running sequence, the newest one is preempted: its pages are freed and it waits to
be recomputed from its prompt and generated tokens. Pure Python, no tensors.
(Chunked prefill is issue 6.)"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from xllm_compile.runtime.kv_cache import KVCache
from xllm_compile.runtime.sequence import Sequence, Status


@dataclass
class Batch:
    seqs: list[Sequence]
    is_prefill: bool


class Scheduler:
    def __init__(self, kv_cache: KVCache, max_num_seqs: int, max_num_tokens: int) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        admitted = self._admit()
        if admitted:
            self.running.extend(admitted)
            return Batch(admitted, is_prefill=True)
        assert self.running, "nothing admitted and nothing running: the KV cache is too small"
        return Batch(self._grow_running(), is_prefill=False)

    def _admit(self) -> list[Sequence]:
        admitted, budget = [], self.max_num_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            # HACK: a preempted sequence may have grown past the budget; it is recomputed alone in
            # one oversized prefill until chunked prefill (issue 6) can split it.
            fits = seq.num_tokens <= budget or not admitted
            if not fits or not self.kv_cache.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            seq.slot = self.kv_cache.allocate(seq.num_tokens)
            seq.status = Status.RUNNING
            budget -= seq.num_tokens
            admitted.append(seq)
        return admitted

    def _grow_running(self) -> list[Sequence]:
        """Room for each running sequence's next token; out of pages, preempt the newest."""
        ready, queue = [], deque(self.running)
        while queue:
            seq = queue.popleft()
            while not self.kv_cache.grow(seq.slot, seq.num_tokens):
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                ready.append(seq)
        return ready

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s KV and put it first in line; its next prefill recomputes every token."""
        self.kv_cache.free(seq.slot)
        seq.slot, seq.num_cached, seq.status = -1, 0, Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.kv_cache.free(seq.slot)
        seq.slot = -1
        self.running.remove(seq)
