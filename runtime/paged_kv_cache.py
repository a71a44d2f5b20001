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

from collections.abc import Callable
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


@dataclass(frozen=True)
class SharedPrefix:
    """The first `num_tokens` positions of another sequence's KV, as its physical pages per
    region (the pages covering those positions; the last may hold them only in part)."""

    num_tokens: int
    pages: list[list[int]]

    def num_full(self, cache: PagedKVCache) -> int:
        """Pages wholly inside the prefix, over all regions: mapped as they are (aliased)."""
        return cache.plan.regions * (self.num_tokens * cache.plan.row_bytes // cache.pool.page_size)

    def num_partial(self, cache: PagedKVCache) -> int:
        """Pages holding the prefix's end in part, over all regions: copied."""
        return cache.pages_for(self.num_tokens) - self.num_full(cache)


class PagedKVCache(KVCache):
    """Slots as contiguous virtual regions; pages mapped on `allocate`/`grow`, unmapped on `free`.

    Owns one reservation of `pool` (released by `close()`); the pool owns the pages. Memory never
    holding a sequence's positions [0, n) is unmapped: only attention's own-length reads are safe.

    `allocate(n, prefix)` maps another sequence's pages for a shared prefix (prefix_cache.py);
    `reclaim(num_pages)`, when set, is asked to free pages (drop stored prefixes) before an
    allocation or growth is refused.
    """

    reclaim: Callable[[int], None] | None = None

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
        self._flat = flat.view(torch.uint8)
        self._scratch = None  # a one-page range: where a retained page is mapped to be copied

    def pages_for(self, num_tokens: int) -> int:
        """Pages a sequence of `num_tokens` positions holds, over all its regions."""
        per_region = -(-num_tokens * self.plan.row_bytes // self.pool.page_size)
        return per_region * self.plan.regions

    def can_allocate(self, num_tokens: int, shared: SharedPrefix | None = None) -> bool:
        # Keep one page per region of every live sequence free, so that admitting a sequence does
        # not force the next decode step to preempt it again (vLLM's watermark, sized by need).
        if not self._free or num_tokens > self.max_len:
            return False
        headroom = len(self._lens) * self.plan.regions
        need = self.pages_for(num_tokens) - (shared.num_full(self) if shared else 0) + headroom
        return self._room(need)

    def _room(self, num_pages: int) -> bool:
        """Whether `num_pages` pages are free, after asking `reclaim` for the shortfall."""
        if num_pages > self.pool.num_free and self.reclaim is not None:
            self.reclaim(num_pages - self.pool.num_free)
        return num_pages <= self.pool.num_free

    def allocate(self, num_tokens: int, prefix: SharedPrefix | None = None) -> int:
        """A slot whose positions [0, num_tokens) are mapped; with `prefix`, its first
        `prefix.num_tokens` positions already hold that prefix's KV (shared pages, and a copy of
        the page where the prefix ends)."""
        if not self._free:
            raise RuntimeError("KV cache has no free slot")
        slot = self._free[-1]
        if prefix is not None:
            self._map_prefix(slot, prefix)
        if not self.grow(slot, max(num_tokens, prefix.num_tokens if prefix else 0)):
            if slot in self._lens:
                self._unmap_all(slot)
            raise RuntimeError(f"KV cache cannot take a sequence of {num_tokens} tokens now")
        return self._free.pop()

    def slot_pages(self, slot: int, num_tokens: int) -> list[list[int]]:
        """The physical pages holding positions [0, num_tokens) of `slot`, per region."""
        per_region = self.pages_for(num_tokens) // self.plan.regions
        out = []
        for offset in self.plan.offsets(slot, self.num_slots):
            base = offset // self.pool.page_size
            out.append([self.vrange.pages[base + i] for i in range(per_region)])
        return out

    def _map_prefix(self, slot: int, prefix: SharedPrefix) -> None:
        """Alias the prefix's whole pages into the empty `slot`; copy its last, partial page."""
        page, end = self.pool.page_size, prefix.num_tokens * self.plan.row_bytes
        full, tail = divmod(end, page)
        offsets = self.plan.offsets(slot, self.num_slots)
        for offset, pages in zip(offsets, prefix.pages, strict=True):
            base = offset // page
            for i in range(full):
                self.pool.map(self.vrange, base + i, page=pages[i])
        if not tail:
            self._lens[slot] = prefix.num_tokens
            self._account()
            return
        sources = [pages[full] for pages in prefix.pages]
        for src in sources:  # held while the copies take fresh pages (reclaim may run)
            self.pool.retain(src)
        try:
            if not self._room(self.plan.regions):
                raise RuntimeError("KV cache has no free page for the shared prefix's last page")
            if self._scratch is None:
                self._scratch = self.pool.reserve(page)
            scratch = self.pool.tensor(self._scratch, torch.uint8)
            for offset, src in zip(self.plan.offsets(slot, self.num_slots), sources, strict=True):
                at = offset // page + full
                self.pool.map(self.vrange, at, page=None)
                self.pool.map(self._scratch, 0, page=src)
                self._flat[at * page : at * page + tail].copy_(scratch[:tail])
                self.pool.unmap(self._scratch, 0)
        except Exception:
            self._unmap_all(slot)
            raise
        finally:
            for src in sources:
                self.pool.drop(src)
        self._lens[slot] = prefix.num_tokens
        self._account()

    def _unmap_all(self, slot: int) -> None:
        """Unmap whatever `slot` has mapped (an allocation that failed half-way)."""
        for offset in self.plan.offsets(slot, self.num_slots):
            base = offset // self.pool.page_size
            for i in range(self.plan.region_bytes // self.pool.page_size):
                if base + i in self.vrange.pages:
                    self.pool.unmap(self.vrange, base + i)
        self._lens.pop(slot, None)
        self._account()

    def grow(self, slot: int, num_tokens: int) -> bool:
        if num_tokens > self.max_len:
            return False
        have = self._lens.get(slot, 0)
        first, last = self.pages_for(have), self.pages_for(num_tokens)
        if last > first and not self._room(last - first):
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
        del self.tensor, self._flat
        if self._scratch is not None:
            self.pool.release(self._scratch)
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
