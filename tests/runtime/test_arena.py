"""Activation arenas: pages mapped from the pool as plans grow, views without copies, and the
arena program of every test family bit-identical to the plain program (logits and KV cache) for
a decode bucket and a ragged prefill, with one arena shared by both."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.passes.graph_utils import count_ops
from xllm_compile.passes.memory_plan import plan_memory
from xllm_compile.runtime import load
from xllm_compile.runtime.arena import Arena, build_arena_runner, make_arena
from xllm_compile.runtime.page_pool import PoolExhaustedError, make_page_pool
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence

PAGE = 4096


@pytest.fixture
def pool():
    pool = make_page_pool("cpu", PAGE, 8)
    yield pool
    pool.close()


def test_fit_maps_pages_and_views_share_the_range(pool):
    arena = Arena(pool, capacity=6 * PAGE)
    assert arena.nbytes == 0 and pool.stats().pages_mapped == 0  # reserving costs no pages
    assert arena.fit(PAGE + 1) == 2 and arena.nbytes == 2 * PAGE
    assert arena.fit(100) == 0  # a smaller plan fits in what is mapped
    a = arena.view(64, (4, 8), torch.float32)
    a.copy_(torch.arange(32.0).view(4, 8))
    flat = pool.tensor(arena.vrange, torch.float32)
    assert torch.equal(flat[16:48], torch.arange(32.0))  # the view is the range, no copy
    assert arena.fit(5 * PAGE) == 3  # grows in place: the earlier view stays valid
    assert torch.equal(a, torch.arange(32.0).view(4, 8))
    b = arena.view(4 * PAGE, (PAGE // 2,), torch.int16)
    b.fill_(7)
    stats = pool.stats()
    assert (stats.pages_mapped, stats.map_calls, stats.bytes_used) == (5, 5, 5 * PAGE)
    arena.close()
    assert pool.stats().pages_free == 8


def test_fit_and_view_errors(pool):
    arena = Arena(pool, capacity=6 * PAGE)
    with pytest.raises(ValueError, match="exceeds"):
        arena.fit(7 * PAGE)
    arena.fit(PAGE)
    with pytest.raises(ValueError, match="past"):
        arena.view(PAGE - 8, (4,), torch.float32)  # not mapped
    with pytest.raises(ValueError, match="misaligned"):
        arena.view(2, (4,), torch.float32)
    other = pool.reserve(8 * PAGE)
    for i in range(6):
        pool.map(other, i)  # 1 page left in the pool
    with pytest.raises(PoolExhaustedError):
        arena.fit(3 * PAGE)
    assert arena.nbytes == PAGE and pool.num_free == 1  # all or nothing
    arena.close()


def _prefill(engine, prompts: list[list[int]]) -> list[Sequence]:
    """Sequences whose prompts went through the plain program (their KV is in the cache)."""
    seqs = []
    for prompt in prompts:
        seq = Sequence(list(prompt), SamplingParams())
        seq.slot = engine.kv_cache.allocate(len(prompt) + 4)
        engine.run_step([seq])
        seq.output_ids.append(prompt[-1] + 1)
        seqs.append(seq)
    return seqs


def _inputs(engine, seqs, all_logits: bool = False) -> list[torch.Tensor]:
    rows = engine.runner.step_rows(seqs, all_logits)
    return [torch.tensor(r, dtype=torch.int64) for r in rows]


def _same_step(gm, program, params, inputs, kv: torch.Tensor) -> None:
    """Run the plain program and the arena program from the same KV contents: logits and the
    KV cache after the step are bit-identical."""
    before = kv.clone()
    with torch.inference_mode():
        (expected,) = gm(*params, *inputs, kv)
        kv_expected = kv.clone()
        kv.copy_(before)
        (got,) = program(*params, *inputs, kv)
    assert torch.equal(got, expected)
    assert torch.equal(kv, kv_expected)


@pytest.mark.parametrize("family", ["llama3", "llama_linear", "qwen2", "qwen3", "mistral"])
def test_arena_program_is_bit_identical(family_models, family):
    engine = load(family_models(family)[2], max_num_seqs=4, kv_cache="contiguous")
    gm, params = engine.runner.graph_module, engine.runner.params
    kv = engine.kv_cache.tensor
    arena = make_arena("cpu", capacity=64 << 20, page_size=PAGE)
    try:
        # decode bucket: 4 sequences of one token each, KV cut to 64 positions (as the cache does)
        seqs = _prefill(engine, [[3, 5, 7], [11, 13], [17, 19, 23, 29], [31]])
        decode = _inputs(engine, seqs)
        kv_view = kv[:, :, :, :64]
        dec_plan = plan_memory(gm, (*params, *decode, kv_view))
        dec_program = build_arena_runner(gm, dec_plan, arena)
        dec_plan.check()
        attrs = [n for n in dec_program.graph.nodes if n.op == "get_attr"]
        assert len(attrs) == dec_plan.num_planned  # one arena view per planned node
        assert count_ops(dec_program, torch.ops.aten.embedding) == 0  # index_select.out instead
        pages = arena.pool.stats().pages_mapped
        assert pages == -(-dec_plan.arena_bytes // PAGE) > 0
        _same_step(gm, dec_program, params, decode, kv_view)
        for seq in seqs:
            engine.kv_cache.free(seq.slot)

        # ragged prefill, every position's logits, in the same arena: it grows to the larger plan
        fresh = [
            Sequence(list(range(3, 12)), SamplingParams()),
            Sequence([40, 41, 42, 43, 44], SamplingParams()),
        ]
        for seq in fresh:
            seq.slot = engine.kv_cache.allocate(16)
        prefill = _inputs(engine, fresh, all_logits=True)
        pre_plan = plan_memory(gm, (*params, *prefill, kv))
        pre_program = build_arena_runner(gm, pre_plan, arena)
        assert pre_plan.arena_bytes > dec_plan.arena_bytes
        assert arena.pool.stats().pages_mapped == -(-pre_plan.arena_bytes // PAGE) > pages
        _same_step(gm, pre_program, params, prefill, kv)

        # the logits live in the arena (overwritten by the next call), and the decode program
        # still runs exactly after the arena grew under it
        with torch.inference_mode():
            (logits,) = pre_program(*params, *prefill, kv)
        start = logits.data_ptr() - arena.vrange.address
        assert 0 <= start < arena.nbytes
        _same_step(gm, dec_program, params, decode, kv_view)
        assert dec_plan.arena_bytes < dec_plan.naive_bytes
        del dec_program, pre_program, logits
    finally:
        arena.close()
