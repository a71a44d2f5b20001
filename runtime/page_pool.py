"""The physical page pool: fixed-size pages mapped on demand into contiguous virtual ranges.

A consumer reserves a virtual range once (address space only, no memory), maps pool pages at
page-aligned offsets as it grows, views the range as a torch tensor without copying, unmaps pages
when it shrinks and releases the range when done. The CPU backend is `page_pool_cpu.py` (memfd +
mmap), CUDA is `page_pool_cuda.py` (driver virtual memory API); `make_page_pool` picks one.
"""

from __future__ import annotations

import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from xllm_compile.errors import BackendUnavailableError, ConfigError


class PoolExhaustedError(RuntimeError):
    """`map` found no free physical page. Callers that can wait check `num_free` first."""


@dataclass(eq=False)
class VirtualRange:
    """A reserved virtual address range. The pool that reserved it owns the address space and the
    pages mapped into it; the consumer owns what it writes there and sets `used_bytes` (how much of
    the mapped memory holds data) so the pool can count waste."""

    address: int
    nbytes: int
    pages: dict[int, int] = field(default_factory=dict)  # page index in range -> physical page
    used_bytes: int = 0
    handle: object = None  # backend bookkeeping (e.g. the CPU view's ctypes buffer)


@dataclass
class PoolStats:
    page_size: int
    pages_total: int
    pages_free: int
    pages_mapped: int
    map_calls: int
    unmap_calls: int
    bytes_mapped: int
    bytes_used: int
    aliases: int = 0  # virtual pages mapped to a physical page that is mapped elsewhere too
    retained: int = 0  # physical pages held by `retain` (the prefix store), mapped or not
    peak_pages_mapped: int = 0  # the most physical pages in use at once

    @property
    def bytes_wasted(self) -> int:
        """Mapped but not holding data: the tail of each range's last page."""
        return self.bytes_mapped - self.bytes_used


class PagePool(ABC):
    """Owns `num_pages` physical pages of `page_size` bytes and every range it reserved.

    Pages are created lazily (a page costs memory once first mapped) and kept after unmap, so a
    freed page is reused by the next map without going back to the OS or driver.

    A physical page may be mapped at several virtual pages at once (`map(..., page=p)`: prefix
    sharing maps one sequence's KV pages into another's range) and held without any mapping
    (`retain`); it has a reference count and goes back to the free list when that reaches zero.
    """

    page_size: int
    num_pages: int

    def __init__(self, page_size: int, num_pages: int) -> None:
        self.page_size, self.num_pages = page_size, num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._ranges: list[VirtualRange] = []
        self.map_calls = self.unmap_calls = 0
        self._refs = [0] * num_pages  # mappings + retains of each physical page
        self._retains = [0] * num_pages  # retains alone
        self._aliases = self._peak = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @abstractmethod
    def reserve(self, nbytes: int) -> VirtualRange:
        """Reserve `nbytes` (rounded up to whole pages) of contiguous virtual address space.

        No physical memory is used; touching an unmapped page is a fault (SIGSEGV on CPU, an
        illegal-address error on CUDA), so consumers read and write mapped pages only.
        Raises:
            OSError / RuntimeError: the OS or driver refused the reservation.
        """

    @abstractmethod
    def map(self, vrange: VirtualRange, index: int, page: int | None = None) -> int:
        """Map a free physical page at page `index` of `vrange`; returns the physical page id.
        With `page`, map that page instead, which must be in use (mapped elsewhere or
        retained): both addresses then show the same bytes (an alias).

        The page's contents are whatever its last user left (zeros when never used).
        Raises:
            PoolExhaustedError: no free page (nothing changed).
            ValueError: `index` is outside the range or already mapped, or `page` is not in use.
        """

    @abstractmethod
    def unmap(self, vrange: VirtualRange, index: int) -> None:
        """Unmap page `index` of `vrange`; its physical page goes back to the pool once nothing
        else maps or retains it (data kept in the page, so mapping it again elsewhere shows the
        same bytes). ValueError if not mapped."""

    def retain(self, page: int) -> None:
        """Hold a reference on an in-use physical page, so that it outlives its mappings."""
        if not 0 <= page < self.num_pages or self._refs[page] == 0:
            raise ValueError(f"physical page {page} is not in use")
        self._refs[page] += 1
        self._retains[page] += 1

    def drop(self, page: int) -> None:
        """Give back a reference taken by `retain`; the page is free once none is left."""
        if self._retains[page] == 0:
            raise ValueError(f"physical page {page} is not retained")
        self._retains[page] -= 1
        self._unref(page)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    @abstractmethod
    def release(self, vrange: VirtualRange) -> None:
        """Unmap every page of `vrange` back into the pool and free its address space. Tensors
        viewing the range must be dropped first: they would point at freed address space."""

    @abstractmethod
    def tensor(self, vrange: VirtualRange, dtype: torch.dtype) -> torch.Tensor:
        """The whole range as a flat tensor of `dtype`, without copying: writes through it land in
        the mapped pages. Only the mapped parts may be touched."""

    def close(self) -> None:
        """Release every range still reserved, then the physical pages."""
        for vrange in list(self._ranges):
            self.release(vrange)

    def stats(self) -> PoolStats:
        mapped = self.num_pages - self.num_free
        used = sum(min(r.used_bytes, len(r.pages) * self.page_size) for r in self._ranges)
        return PoolStats(
            self.page_size,
            self.num_pages,
            self.num_free,
            mapped,
            self.map_calls,
            self.unmap_calls,
            mapped * self.page_size,
            used,
            self._aliases,
            sum(1 for n in self._retains if n),
            self._peak,
        )

    # Bookkeeping shared by the backends: they call these around the OS/driver calls.
    def _take_page(self, vrange: VirtualRange, index: int, page: int | None = None) -> int:
        if not 0 <= index < vrange.nbytes // self.page_size:
            raise ValueError(f"page {index} is outside a range of {vrange.nbytes} bytes")
        if index in vrange.pages:
            raise ValueError(f"page {index} of the range is already mapped")
        if page is not None:
            if not 0 <= page < self.num_pages or self._refs[page] == 0:
                raise ValueError(f"physical page {page} is not in use: nothing to alias")
            return page
        if not self._free:
            raise PoolExhaustedError(f"all {self.num_pages} pages are mapped")
        return self._free.pop()

    def _map_failed(self, page: int) -> None:
        """The OS/driver refused to map `page` (taken by _take_page): put a fresh one back."""
        if self._refs[page] == 0:
            self._free.append(page)

    def _page_mapped(self, vrange: VirtualRange, index: int, page: int) -> None:
        vrange.pages[index] = page
        self.map_calls += 1
        if self._refs[page]:
            self._aliases += 1
        self._refs[page] += 1
        self._peak = max(self._peak, self.num_pages - len(self._free))

    def _page_unmapped(self, vrange: VirtualRange, index: int) -> None:
        page = vrange.pages.pop(index)
        self.unmap_calls += 1
        if self._refs[page] > 1:
            self._aliases = max(0, self._aliases - 1)
        self._unref(page)

    def _unref(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)


def os_page_size() -> int:
    return mmap.PAGESIZE


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def available_memory(device: str) -> int:
    """Bytes the device can still give: MemAvailable on CPU, free memory on CUDA."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def budget_bytes(budget: int | float, device: str) -> int:
    """A memory budget as bytes: an int is bytes, a float in (0, 1] a fraction of what is free."""
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ConfigError(f"memory utilization must be in (0, 1], got {budget}")
        return int(available_memory(device) * budget)
    if budget <= 0:
        raise ConfigError(f"memory budget must be a positive number of bytes, got {budget}")
    return int(budget)


def make_page_pool(device: str, page_size: int, num_pages: int) -> PagePool:
    """The pool for `device`. Raises BackendUnavailableError where the backend cannot map pages."""
    kind, _, index = device.partition(":")  # not torch.device: "npu" is unknown without torch_npu
    if kind == "cpu":
        from xllm_compile.runtime.page_pool_cpu import CpuPagePool

        return CpuPagePool(page_size, num_pages)
    if kind == "cuda":
        from xllm_compile.runtime.page_pool_cuda import CudaPagePool

        return CudaPagePool(page_size, num_pages, int(index or 0))
    if kind == "npu":
        # torch_npu exposes no virtual-memory calls (aclrtReserveMemAddress / aclrtMapMem) to
        # Python; a backend needs a small C extension over ACL.
        raise BackendUnavailableError(
            "page-mapped KV cache on npu: torch_npu provides no virtual memory mapping calls; "
            "load with kv_cache='contiguous'"
        )
    raise BackendUnavailableError(f"no page pool for device {device!r}; use cpu or cuda")
