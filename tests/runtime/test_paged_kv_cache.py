"""The page-mapped KV cache: its tensor addresses what a contiguous cache would, slots grow and
free pages, running out is a False (not a crash), and 10,000 random grow/free operations leave
no overlap between live sequences and every page back in the pool."""

from __future__ import annotations

import random

import pytest
import torch

from xllm_compile.errors import ConfigError
from xllm_compile.runtime.page_pool import make_page_pool
from xllm_compile.runtime.paged_kv_cache import (
    LAYOUTS,
    KVGeometry,
    PagedKVCache,
    build_paged_kv_cache,
)

GEOMETRY = KVGeometry(
    num_layers=2, num_slots=6, max_len=40, num_kv_heads=2, head_dim=8, dtype=torch.float32
)
PAGE = 4096  # token-major: 256 B per token -> 16 tokens a page; layer-major: 64 B -> 64 tokens


def make_cache(layout: str, num_pages: int, geometry: KVGeometry = GEOMETRY) -> PagedKVCache:
    return PagedKVCache(make_page_pool("cpu", PAGE, num_pages), geometry, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_writes_land_where_a_contiguous_cache_puts_them(layout):
    cache = make_cache(layout, 64)
    ref = torch.zeros(cache.tensor.shape)  # [L, 2, S, M, Hkv, D]
    slots = [cache.allocate(n) for n in (5, 40, 17)]
    for slot, n in zip(slots, (5, 40, 17), strict=True):
        values = torch.randn(2, 2, n, 2, 8)  # [L, 2, n, Hkv, D]
        cache.tensor[:, :, slot, :n] = values  # what store_kv does, one slot at a time
        ref[:, :, slot, :n] = values
    for slot, n in zip(slots, (5, 40, 17), strict=True):
        assert torch.equal(cache.tensor[:, :, slot, :n], ref[:, :, slot, :n])
    cache.close()


def test_token_major_keeps_a_token_of_every_layer_together():
    cache = make_cache("token_major", 8)
    t = cache.tensor  # [L, 2, S, M, Hkv, D]
    assert t.stride(3) == 2 * 2 * 2 * 8  # next position: past all layers' K and V of one token
    assert t.stride(0) == 2 * 2 * 8 and t.stride(1) == 2 * 8
    cache.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grow_maps_pages_and_free_returns_them_for_reuse(layout):
    cache = make_cache(layout, 24)
    pool = cache.pool
    slot = cache.allocate(17)
    held = pool.num_pages - pool.num_free
    assert held == cache.pages_for(17)
    assert cache.grow(slot, 20) and pool.num_pages - pool.num_free == cache.pages_for(20)
    pages = sorted(cache.vrange.pages.values())
    cache.free(slot)
    assert pool.num_free == pool.num_pages
    again = cache.allocate(20)
    assert again == slot and sorted(cache.vrange.pages.values()) == pages  # same pages reused
    cache.close()


def test_out_of_pages_is_false_and_changes_nothing():
    cache = make_cache("token_major", 4)  # 4 pages of 16 tokens: one sequence of 40 + 1 page
    a = cache.allocate(33)  # 3 pages
    b = cache.allocate(1)  # 1 page
    assert not cache.can_allocate(1)
    before = dict(cache.vrange.pages)
    assert not cache.grow(b, 17)  # needs a second page: none left
    assert cache.vrange.pages == before
    assert cache.grow(a, 40)  # still inside its third page
    cache.free(a)
    assert cache.grow(b, 17)
    cache.close()


def test_admission_keeps_a_page_per_live_sequence_free():
    cache = make_cache("token_major", 6)  # 16 tokens a page; max length 40 takes 3 pages
    cache.allocate(16)  # 1 page, 5 free
    assert cache.can_allocate(40)  # 3 pages + 1 of headroom for the live sequence
    cache.allocate(40)  # 2 free
    assert not cache.can_allocate(16)  # 1 page + 2 of headroom
    assert cache.pool.num_free == 2
    cache.close()


def test_a_budget_below_one_max_length_sequence_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot hold one sequence"):
        make_cache("token_major", 2)
    with pytest.raises(ConfigError, match="layout"):
        make_cache("row_major", 8)


def test_build_sizes_the_pool_from_the_budget():
    full = build_paged_kv_cache(GEOMETRY, memory=1 << 30)  # more than every slot needs: capped
    assert full.pool.num_pages == GEOMETRY.num_slots * full.pages_for(GEOMETRY.max_len)
    assert full.pool.page_size == 4096  # 16 tokens of 256 B
    small = build_paged_kv_cache(GEOMETRY, memory=5 * 4096)
    assert small.pool.num_pages == 5
    full.close(), small.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_10000_random_grow_free_ops_keep_regions_disjoint_and_return_every_page(layout):
    geometry = KVGeometry(3, 12, 100, 1, 16, torch.float32)  # token-major: 384 B/token
    cache = make_cache(layout, 40, geometry)
    rng = random.Random(0)
    lens: dict[int, int] = {}
    for op in range(10_000):
        live = list(lens)
        if live and (rng.random() < 0.3 or not cache.num_free_slots):
            slot = rng.choice(live)
            _check_owned(cache, slot, lens.pop(slot))
            cache.free(slot)
        elif live and rng.random() < 0.6:
            slot = rng.choice(live)
            n = min(lens[slot] + rng.randint(1, 30), geometry.max_len)
            if cache.grow(slot, n):
                _stamp(cache, slot, lens[slot], n)
                lens[slot] = n
        else:
            n = rng.randint(1, 60)
            if cache.can_allocate(n):
                slot = cache.allocate(n)
                _stamp(cache, slot, 0, n)
                lens[slot] = n
        if op % 500 == 0:
            _check_disjoint(cache)
    for slot, n in lens.items():
        _check_owned(cache, slot, n)
        cache.free(slot)
    stats = cache.pool.stats()
    assert stats.pages_free == stats.pages_total == 40 and stats.pages_mapped == 0
    assert stats.map_calls == stats.unmap_calls > 1000
    cache.close()


def _stamp(cache, slot, start, end):
    cache.tensor[:, :, slot, start:end] = float(slot)  # every layer's K/V rows of these tokens


def _check_owned(cache, slot, n):
    """Nobody else wrote into this slot's rows: no two live sequences share a physical page."""
    assert bool((cache.tensor[:, :, slot, :n] == slot).all())


def _check_disjoint(cache):
    pages = list(cache.vrange.pages.values())
    assert len(pages) == len(set(pages))  # a physical page is mapped at one place at most
    assert len(pages) + cache.pool.num_free == cache.pool.num_pages
