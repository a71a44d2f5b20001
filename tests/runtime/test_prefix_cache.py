"""Prefix sharing by page aliasing: one physical page mapped at several virtual addresses (real
memfd mappings), the paged cache mapping a prefix's pages into a new slot (whole pages aliased,
the last copied), and the engine: identical tokens with sharing on and off, fewer physical
pages, a finished sequence's prefix reused from the store, stored prefixes evicted before any
running sequence is preempted, and a burst of one prompt computed once."""

from __future__ import annotations

import random

import pytest
import torch

from xllm_compile.runtime import load
from xllm_compile.runtime.page_pool import make_page_pool
from xllm_compile.runtime.paged_kv_cache import KVGeometry, PagedKVCache, SharedPrefix
from xllm_compile.runtime.prefix_cache import BLOCK, chain_hashes

PAGE = 4096  # the test models keep 512 B of K/V per token: 8 tokens a page


def test_one_physical_page_at_two_addresses_shows_the_same_bytes():
    pool = make_page_pool("cpu", PAGE, 4)
    a, b = pool.reserve(2 * PAGE), pool.reserve(2 * PAGE)
    page = pool.map(a, 1)
    ta, tb = pool.tensor(a, torch.uint8), pool.tensor(b, torch.uint8)
    ta[PAGE : PAGE + 5] = torch.arange(1, 6, dtype=torch.uint8)
    assert pool.map(b, 0, page=page) == page and pool.refcount(page) == 2
    assert tb[:5].tolist() == [1, 2, 3, 4, 5]  # the same memory
    tb[7] = 9
    assert int(ta[PAGE + 7]) == 9
    assert pool.stats().aliases == 1 and pool.num_free == 3  # one physical page in use
    pool.unmap(a, 1)
    assert pool.refcount(page) == 1 and pool.num_free == 3 and tb[:5].tolist() == [1, 2, 3, 4, 5]
    pool.retain(page)  # held without a mapping (the prefix store)
    pool.unmap(b, 0)
    assert pool.refcount(page) == 1 and pool.num_free == 3 and pool.stats().retained == 1
    c = pool.reserve(PAGE)
    pool.map(c, 0, page=page)
    assert pool.tensor(c, torch.uint8)[:5].tolist() == [1, 2, 3, 4, 5]  # kept while retained
    pool.drop(page)
    pool.unmap(c, 0)
    assert pool.refcount(page) == 0 and pool.num_free == 4
    with pytest.raises(ValueError, match="not in use"):
        pool.map(a, 0, page=page)  # a free page is no alias
    pool.close()


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("shared_tokens", [32, 37])  # on a page boundary, and into a page
def test_a_shared_prefix_aliases_whole_pages_and_copies_the_last(layout, shared_tokens):
    g = KVGeometry(2, 3, 128, 2, 16, torch.float32)
    row = 512 if layout == "token_major" else 128  # a token's bytes in one region
    page = PAGE  # 8 tokens a page token-major, 32 in each of the 4 regions layer-major
    cache = PagedKVCache(make_page_pool("cpu", page, 64), g, layout)
    src = cache.allocate(60)
    cache.tensor[:, :, src, :60] = torch.randn(2, 2, 60, 2, 16)
    before = cache.tensor[:, :, src, :60].clone()
    prefix = SharedPrefix(shared_tokens, cache.slot_pages(src, shared_tokens))
    used = cache.pool.num_pages - cache.pool.num_free
    dst = cache.allocate(70, prefix)
    full = shared_tokens * row // page
    assert prefix.num_full(cache) == full * cache.plan.regions
    same = cache.tensor[:, :, dst, :shared_tokens]
    assert torch.equal(same, before[:, :, :shared_tokens])  # the prefix's KV, bit for bit
    # only the pages past the shared ones are new: the copied partial page and the rest
    new = cache.pages_for(70) - prefix.num_full(cache)
    assert cache.pool.num_pages - cache.pool.num_free == used + new
    assert cache.pool.stats().aliases == prefix.num_full(cache)
    cache.tensor[:, :, dst, shared_tokens:70] = 7.0  # the new sequence writes its own tokens
    assert torch.equal(cache.tensor[:, :, src, :60], before)  # the source sees none of it
    cache.free(src)  # the shared pages stay with dst
    assert torch.equal(cache.tensor[:, :, dst, :shared_tokens], before[:, :, :shared_tokens])
    cache.free(dst)
    assert cache.pool.num_free == cache.pool.num_pages
    cache.close()


def test_chain_hashes_cover_every_token_before_a_block():
    a = list(range(40))
    b = a[:20] + [99] + a[21:]
    ha, hb = chain_hashes(a, 2), chain_hashes(b, 2)
    assert ha[0] == hb[0] and ha[1] != hb[1]  # block 1 differs, and so does every later one
    assert chain_hashes(a, 2, ha[:1]) == ha and len(ha) == 40 // BLOCK


def prompts_with_prefix(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [1] + [rng.randrange(3, 320) for _ in range(prefix_len - 1)]
    return [prefix + [rng.randrange(3, 320) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def generate(engine, prompts, max_tokens=12):
    return [c.token_ids for c in engine.generate(prompts, max_tokens=max_tokens, ignore_eos=True)]


def test_shared_prefix_gives_the_same_tokens_on_fewer_pages(llama_artifact):
    prompts = prompts_with_prefix(6, 45)
    off = load(llama_artifact, kv_page_size=PAGE, prefix_caching=False)
    on = load(llama_artifact, kv_page_size=PAGE)
    assert off.prefix_cache is None and on.prefix_cache is not None
    # the first prompt alone, then the rest together: they all share its pages
    first_off, first_on = generate(off, prompts[:1]), generate(on, prompts[:1])
    assert first_on == first_off
    assert generate(on, prompts[1:]) == generate(off, prompts[1:])
    s = on.prefix_cache.stats
    assert s.requests_hit == 5 and s.hits >= 5 * 45 - 5 and s.pages_shared >= 5 * 5
    assert s.queries == sum(map(len, prompts))
    peak_on = on.kv_cache.pool.stats().peak_pages_mapped
    peak_off = off.kv_cache.pool.stats().peak_pages_mapped
    assert peak_on < peak_off  # the 45-token prefix is held once, not five times


def test_a_burst_of_one_prompt_computes_it_once(llama_artifact):
    prompt = prompts_with_prefix(1, 40)[0]
    engine = load(llama_artifact, kv_page_size=PAGE)
    alone = generate(load(llama_artifact, prefix_caching=False), [prompt])[0]
    out = generate(engine, [prompt] * 4)
    assert out == [alone] * 4
    s = engine.prefix_cache.stats
    assert s.deferred >= 1 and s.requests_hit == 3
    assert s.hits == 3 * (len(prompt) - 1)  # all but the last token, which gives the logits


def test_stored_prefixes_are_evicted_before_anything_is_preempted(llama_artifact):
    prompts = [p for seed in range(4) for p in prompts_with_prefix(2, 40, seed)]
    alone = [generate(load(llama_artifact, prefix_caching=False), [p])[0] for p in prompts]
    engine = load(llama_artifact, kv_memory=40 * PAGE, kv_page_size=PAGE)
    got = [generate(engine, [p])[0] for p in prompts]  # one at a time: each finished one stored
    assert got == alone
    s = engine.prefix_cache.stats
    assert s.requests_hit >= 1  # a pair shares its prefix with the stored first of the pair
    assert s.evictions > 0 and engine.scheduler.num_preemptions == 0  # the store made way
    stats = engine.kv_cache.pool.stats()
    assert stats.pages_mapped == stats.retained  # nothing but the store holds pages


def test_sharing_holds_with_the_cpu_graph_cache_and_the_arena(llama_artifact):
    """As the CLI runs (CPU graphs over the activation arena): shared pages, the same tokens."""
    prompts = prompts_with_prefix(5, 40, seed=3)
    off = load(llama_artifact, kv_page_size=PAGE, prefix_caching=False, graph_cache=True)
    on = load(llama_artifact, kv_page_size=PAGE, graph_cache=True, arena=True)
    want = generate(off, prompts[:1]) + generate(off, prompts[1:])
    assert generate(on, prompts[:1]) + generate(on, prompts[1:]) == want
    assert on.prefix_cache.stats.requests_hit == 4 and on.runner.stats.arena_programs > 0
    assert on.runner.stats.hits > 0  # decode steps of aliased sequences ran the cached graphs
