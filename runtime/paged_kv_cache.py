"""The KV cache on the page pool: one virtual reservation holds every slot's region at its full
max length, and physical pages are mapped into a slot's region only as its sequence grows.

The program still sees one tensor [L, 2, S, M, Hkv, D] (a strided view over the reservation), and
attention reads each sequence's KV as contiguous rows: no block table. Two physical layouts:

- "token_major" (default): slot s is one region [M, L, 2, Hkv, D]; a token's K and V of every
  layer sit together, so a sequence grows one region and wastes at most one partial page.
- "layer_major": 2L regions [M, Hkv, D] per slot, one per (layer, K/V); each has a partial page.

Measured by tools/bench/bench_page_pool.py (300 sequences, log-normal lengths, median 550, max
4096, bf16): token-major maps 19-21% of a contiguous max-length preallocation. With 2 MiB pages
(the CUDA granularity) token-major wastes 5.4% / 9.8% / 1.0% of what it maps for SmolLM2-135M /
Qwen2.5-0.5B / Llama-3-8B, layer-major 86% / 90% / 43% (more than the contiguous cache for the
small models). With 16-token pages on CPU both waste about 1%, but layer-major makes 45-64 times
the mappings (673k-955k, each a kernel VMA, far past vm.max_map_count = 65530). So token-major.
Its cost: the reference attention gathers rows 2L times further apart; SmolLM2-135M-shaped fp32
decode on 2 CPU cores, batch 8 at 512 tokens: 117 ms/step against 99 (plain tensor) and 95
(layer-major); at batch 1: 36 against 35. An attention kernel that streams token-major rows
would win that back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xllm_compile.errors import ConfigError
from xllm_compile.runtime.kv_cache import KVCache
from xllm_compile.runtime.page_pool import (
    PagePool,
    budget_bytes,
    make_page_pool,
    os_page_size,
    round_up,
)

LAYOUTS = ("token_major", "layer_major")
TOKENS_PER_PAGE = 16  # default page: 16 token rows (vLLM's block size), rounded to the granularity
CUDA_GRANULARITY = 2 << 20  # cuMemGetAllocationGranularity on current NVIDIA GPUs


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_slots: int
    max_len: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def token_bytes(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(frozen=True)
class _Plan:
    """Where a layout puts things: `regions` regions of `region_bytes` per slot, each holding
    `row_bytes` per token, and the element strides of the [L, 2, S, M, Hkv, D] view."""

    regions: int
    row_bytes: int
    region_bytes: int
    strides: tuple[int, ...]

    def offsets(self, slot: int, num_slots: int) -> list[int]:
        if self.regions == 1:  # token-major: slot-major reservation
            return [slot * self.region_bytes]
        # layer-major: region (layer, kv, slot) at ((layer * 2 + kv) * S + slot)
        return [(r * num_slots + slot) * self.region_bytes for r in range(self.regions)]


def _plan(g: KVGeometry, layout: str, page_size: int) -> _Plan:
    hd = g.num_kv_heads * g.head_dim
    item = g.dtype.itemsize
    if layout == "token_major":
        row = g.token_bytes  # [L, 2, Hkv, D] per token
        region = round_up(g.max_len * row, page_size)
        s = region // item
        return _Plan(1, row, region, (2 * hd, hd, s, g.num_layers * 2 * hd, g.head_dim, 1))
    if layout == "layer_major":
        row = hd * item  # [Hkv, D] per token
        region = round_up(g.max_len * row, page_size)
        r = region // item
        strides = (2 * g.num_slots * r, g.num_slots * r, r, hd, g.head_dim, 1)
        return _Plan(2 * g.num_layers, row, region, strides)
    raise ConfigError(f"unknown KV layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


class PagedKVCache(KVCache):
    """Slots as contiguous virtual regions; pages mapped on `allocate`/`grow`, unmapped on `free`.

    Owns one reservation of `pool` (released by `close()`); the pool owns the pages. Memory never
    holding a sequence's positions [0, n) is unmapped: only attention's own-length reads are safe.
    """

    def __init__(self, pool: PagePool, geometry: KVGeometry, layout: str = "token_major"):
        self.pool, self.geometry, self.layout = pool, geometry, layout
        self.plan = _plan(geometry, layout, pool.page_size)
        g = geometry
        if self.pages_for(g.max_len) > pool.num_pages:
            raise ConfigError(
                f"the KV page pool ({pool.num_pages} pages of {pool.page_size} bytes) cannot hold "
                f"one sequence of max length {g.max_len}; raise the memory budget"
            )
        self.vrange = pool.reserve(g.num_slots * self.plan.regions * self.plan.region_bytes)
        flat = pool.tensor(self.vrange, g.dtype)
        shape = (g.num_layers, 2, g.num_slots, g.max_len, g.num_kv_heads, g.head_dim)
        self.tensor = flat.as_strided(shape, self.plan.strides)
        self._free = list(range(g.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._lens: dict[int, int] = {}  # live slot -> positions it may write

    def pages_for(self, num_tokens: int) -> int:
        """Pages a sequence of `num_tokens` positions holds, over all its regions."""
        per_region = -(-num_tokens * self.plan.row_bytes // self.pool.page_size)
        return per_region * self.plan.regions

    def can_allocate(self, num_tokens: int) -> bool:
        # Keep one page per region of every live sequence free, so that admitting a sequence does
        # not force the next decode step to preempt it again (vLLM's watermark, sized by need).
        headroom = len(self._lens) * self.plan.regions
        return (
            bool(self._free)
            and num_tokens <= self.max_len
            and self.pages_for(num_tokens) + headroom <= self.pool.num_free
        )

    def allocate(self, num_tokens: int) -> int:
        if not self._free or not self.grow(self._free[-1], num_tokens):
            raise RuntimeError(f"KV cache cannot take a sequence of {num_tokens} tokens now")
        return self._free.pop()

    def grow(self, slot: int, num_tokens: int) -> bool:
        if num_tokens > self.max_len:
            return False
        have = self._lens.get(slot, 0)
        first, last = self.pages_for(have), self.pages_for(num_tokens)
        if last - first > self.pool.num_free:
            return False
        per_region = last // self.plan.regions
        for offset in self.plan.offsets(slot, self.num_slots):
            base = offset // self.pool.page_size
            for i in range(first // self.plan.regions, per_region):
                self.pool.map(self.vrange, base + i)
        self._lens[slot] = max(have, num_tokens)
        self._account()
        return True

    def free(self, slot: int) -> None:
        assert slot in self._lens and slot not in self._free, f"slot {slot} is not allocated"
        for offset in self.plan.offsets(slot, self.num_slots):
            base = offset // self.pool.page_size
            # last page first, so the pool's LIFO free list hands pages out in region order
            for i in reversed(range(self.pages_for(self._lens[slot]) // self.plan.regions)):
                self.pool.unmap(self.vrange, base + i)
        del self._lens[slot]
        self._free.append(slot)
        self._account()

    def _account(self) -> None:
        tokens = sum(self._lens.values())
        self.vrange.used_bytes = tokens * self.plan.row_bytes * self.plan.regions

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def close(self) -> None:
        """Release the reservation; `tensor` must not be used afterwards."""
        del self.tensor
        self.pool.release(self.vrange)


def build_paged_kv_cache(
    geometry: KVGeometry,
    device: str = "cpu",
    memory: int | float = 0.5,
    page_size: int | None = None,
    layout: str = "token_major",
) -> PagedKVCache:
    """A page pool sized by `memory` (bytes, or a fraction of the device's free memory), capped at
    what every slot at max length would need, and the paged cache on it.

    Raises:
        ConfigError: bad budget, page size or layout, or a budget below one max-length sequence.
        BackendUnavailableError: the device cannot map pages (see `make_page_pool`).
    """
    if page_size is None:
        granularity = CUDA_GRANULARITY if device.startswith("cuda") else os_page_size()
        row = _plan(geometry, layout, 1).row_bytes
        page_size = round_up(TOKENS_PER_PAGE * row, granularity)
    plan = _plan(geometry, layout, page_size)
    need = geometry.num_slots * plan.regions * plan.region_bytes // page_size
    num_pages = min(budget_bytes(memory, device) // page_size, need)
    return PagedKVCache(make_page_pool(device, page_size, num_pages), geometry, layout)
