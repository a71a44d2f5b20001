"""The scheduler with a pure-Python KV cache of counted pages: out of pages it stops admitting,
preempts the newest sequence, and recomputes it later from all its tokens; it never stalls."""

from __future__ import annotations

import random

from xllm_compile.runtime.kv_cache import KVCache
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.scheduler import Scheduler
from xllm_compile.runtime.sequence import Sequence, Status


class CountedPages(KVCache):
    """`num_pages` pages of `page` tokens; no tensor."""

    def __init__(self, num_slots: int, max_len: int, num_pages: int, page: int = 4) -> None:
        self.slots, self.max, self.page, self.num_free = num_slots, max_len, page, num_pages
        self.held: dict[int, int] = {}

    @property
    def max_len(self) -> int:
        return self.max

    def _pages(self, n: int) -> int:
        return -(-n // self.page)

    def can_allocate(self, num_tokens: int) -> bool:
        return len(self.held) < self.slots and self._pages(num_tokens) <= self.num_free

    def allocate(self, num_tokens: int) -> int:
        slot = min(set(range(self.slots)) - set(self.held))
        self.held[slot] = 0
        assert self.grow(slot, num_tokens)
        return slot

    def grow(self, slot: int, num_tokens: int) -> bool:
        need = self._pages(num_tokens) - self.held[slot]
        if need > self.num_free:
            return False
        self.num_free -= max(need, 0)
        self.held[slot] += max(need, 0)
        return True

    def free(self, slot: int) -> None:
        self.num_free += self.held.pop(slot)


def seq(n: int) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=8))


def step(sched: Scheduler) -> list[Sequence]:
    """One engine step without a model: every scheduled sequence caches its tokens and samples 7."""
    return step_batch(sched, sched.schedule())


def step_batch(sched: Scheduler, batch) -> list[Sequence]:
    """As Engine.step: each computes its scheduled tokens; one whose prompt is all computed
    samples."""
    for s in batch.seqs:
        s.num_cached += s.num_scheduled
        if s.num_cached < s.num_tokens:
            continue  # a chunk of its prompt: nothing sampled yet
        s.output_ids.append(7)
        if len(s.output_ids) >= s.params.max_tokens:
            sched.finish(s, "length")
    return batch.seqs


def test_out_of_pages_preempts_the_newest_and_recomputes_all_its_tokens():
    sched = Scheduler(CountedPages(4, 64, num_pages=4), max_num_seqs=4, max_num_tokens=64)
    a, b = seq(4), seq(4)  # one page each
    sched.add(a), sched.add(b)
    assert step(sched) == [a, b]  # prefill: 5 tokens each, 2 pages free
    for _ in range(4):
        assert step(sched) == [a, b]  # decode up to 9 tokens: 2 pages each, none free
    assert step(sched) == [a]  # a's 9th token needs a third page: b, the newest, is preempted
    assert sched.num_preemptions == 1 and b.status == Status.WAITING and b.slot == -1
    assert sched.waiting[0] is b and b.pending_ids() == b.all_ids  # recomputed from all 9
    assert len(b.all_ids) == 9 and len(b.output_ids) == 5
    while b not in (batch := sched.schedule()).seqs:
        step_batch(sched, batch)
    assert batch.is_prefill and b.num_cached == 0  # b's recompute: one prefill of 9 tokens


def test_a_lone_sequence_that_cannot_grow_preempts_itself_and_comes_back():
    kv = CountedPages(2, 64, num_pages=2)
    sched = Scheduler(kv, max_num_seqs=2, max_num_tokens=64)
    a = seq(8)  # 2 pages: the whole pool
    sched.add(a)
    step(sched)  # 9 tokens: the next decode needs a third page
    assert step(sched) == []  # preempted itself: an empty step, no crash
    kv.num_free = 4  # memory comes back (in the real cache a max-length sequence always fits)
    assert step(sched) == [a]  # recomputed


def test_a_recompute_longer_than_the_token_budget_is_prefilled_in_chunks():
    sched = Scheduler(CountedPages(2, 64, num_pages=16), max_num_seqs=2, max_num_tokens=10)
    long, short = seq(9), seq(3)
    long.output_ids = [7, 7, 7]  # 12 tokens: preempted after generating, over the budget of 10
    sched.add(long), sched.add(short)
    assert step(sched) == [long] and long.num_cached == 10  # the budget's first chunk
    assert len(long.output_ids) == 3  # a chunk samples nothing
    batch = sched.schedule()
    assert batch.seqs == [long, short] and [s.num_scheduled for s in batch.seqs] == [2, 3]
    step_batch(sched, batch)
    assert len(long.output_ids) == 4 and short.output_ids == [7]


def test_decodes_go_first_and_a_long_prompt_takes_what_is_left_of_the_budget():
    sched = Scheduler(CountedPages(9, 4096, num_pages=4096), max_num_seqs=9, max_num_tokens=64)
    streams = [Sequence([1] * 5, SamplingParams(max_tokens=64)) for _ in range(8)]
    for s in streams:
        sched.add(s)
    step(sched)  # the 8 prompts in one step (40 tokens)
    long = seq(300)
    sched.add(long)
    chunks = []
    while not long.output_ids:  # until its prompt is all computed
        batch = sched.schedule()
        assert batch.num_tokens <= 64
        assert all(s in batch.seqs and s.num_scheduled == 1 for s in streams)  # never stalled
        chunks.append(long.num_scheduled)
        step_batch(sched, batch)
    assert chunks[0] == 64 - 8 - 0 and sum(chunks) == 300  # 56 a step beside the 8 decodes
    assert all(c == 56 for c in chunks[:-1])


def test_random_workloads_always_finish_with_every_page_back():
    rng, preemptions = random.Random(0), 0
    for trial in range(20):
        total = rng.randint(12, 30)
        kv = CountedPages(6, 48, num_pages=total)
        sched = Scheduler(kv, max_num_seqs=6, max_num_tokens=64)
        seqs = [
            Sequence([1] * rng.randint(1, 30), SamplingParams(max_tokens=16)) for _ in range(12)
        ]
        for s in seqs:
            sched.add(s)
        for _ in range(2000):
            if not sched.has_work():
                break
            step(sched)
        assert all(s.is_finished and len(s.output_ids) == 16 for s in seqs), trial
        assert kv.num_free == total and not kv.held
        preemptions += sched.num_preemptions
    assert preemptions > 20  # the pools were small enough to matter
