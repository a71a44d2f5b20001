"""Chooses what runs in each step, nano-vllm style: admit waiting sequences for prefill while slots
and the token budget allow, otherwise decode every running sequence. Pure Python, no tensors.
(Continuous batching with chunked prefill and preemption is issue 6.)"""

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

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        admitted, budget = [], self.max_num_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_tokens > budget or not self.kv_cache.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            seq.slot = self.kv_cache.allocate(seq.num_tokens)
            seq.status = Status.RUNNING
            budget -= seq.num_tokens
            admitted.append(seq)
        if admitted:
            self.running.extend(admitted)
            return Batch(admitted, is_prefill=True)
        assert self.running, "nothing admitted and nothing running: a prompt exceeds the budget"
        for seq in self.running:
            self.kv_cache.grow(seq.slot, seq.num_tokens)
        return Batch(list(self.running), is_prefill=False)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.kv_cache.free(seq.slot)
        seq.slot = -1
        self.running.remove(seq)
