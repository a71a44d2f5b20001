"""CPU page pool: physical pages are offsets in one memfd; a virtual range is a PROT_NONE
reservation into which pages are mapped with mmap(MAP_FIXED | MAP_SHARED, memfd, offset).

Unmapping maps a fresh PROT_NONE anonymous page over the slot instead of munmap, so the hole never
leaves the reservation (another mmap in the process could otherwise land in it). Each mapped page
is one kernel VMA unless its neighbour happens to be the next memfd page, so the number of mapped
pages must stay under vm.max_map_count (65530 by default): pick pages of at least 16 tokens.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import torch

from xllm_compile.errors import ConfigError
from xllm_compile.runtime.page_pool import PagePool, VirtualRange, os_page_size, round_up

# <sys/mman.h> values the `mmap` module lacks (Python 3.11): Linux x86-64 / arm64 / generic.
PROT_NONE = 0
MAP_FIXED = 0x10
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_RESERVE_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,  # off_t (64-bit on every platform Python 3.10+ supports here)
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    out = _libc.mmap(addr, length, prot, flags, fd, offset)
    if out in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return out


def _munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap failed: {os.strerror(err)}")


class CpuPagePool(PagePool):
    """Pages live in one memfd of `page_size * num_pages` bytes. ftruncate makes it sparse: a
    page takes memory on first write and keeps it while the pool lives (reuse, not give-back)."""

    def __init__(self, page_size: int, num_pages: int) -> None:
        if page_size <= 0 or page_size % os_page_size():
            raise ConfigError(
                f"page size {page_size} is not a multiple of the OS page size ({os_page_size()})"
            )
        super().__init__(page_size, num_pages)
        self.fd = os.memfd_create(f"xllm-pages-{os.getpid()}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, page_size * num_pages)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        self._unmappers: dict[int, weakref.finalize] = {}  # range address -> its munmap

    def reserve(self, nbytes: int) -> VirtualRange:
        nbytes = round_up(max(nbytes, 1), self.page_size)
        address = _mmap(None, nbytes, PROT_NONE, _RESERVE_FLAGS, -1, 0)
        # The ctypes array over the range is what tensors keep alive (frombuffer holds it), so the
        # range is unmapped when the last view and the range object are gone, or at release().
        handle = (ctypes.c_uint8 * nbytes).from_address(address)
        self._unmappers[address] = weakref.finalize(handle, _munmap, address, nbytes)
        vrange = VirtualRange(address, nbytes, handle=handle)
        self._ranges.append(vrange)
        return vrange

    def map(self, vrange: VirtualRange, index: int, page: int | None = None) -> int:
        page = self._take_page(vrange, index, page)
        addr = vrange.address + index * self.page_size
        try:
            got = _mmap(
                addr,
                self.page_size,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED | MAP_FIXED,
                self.fd,
                page * self.page_size,
            )
        except OSError:
            self._map_failed(page)  # ENOMEM here usually means vm.max_map_count was hit
            raise
        assert got == addr, "MAP_FIXED returned another address"
        self._page_mapped(vrange, index, page)
        return page

    def unmap(self, vrange: VirtualRange, index: int) -> None:
        if index not in vrange.pages:
            raise ValueError(f"page {index} of the range is not mapped")
        addr = vrange.address + index * self.page_size
        _mmap(addr, self.page_size, PROT_NONE, _RESERVE_FLAGS | MAP_FIXED, -1, 0)
        self._page_unmapped(vrange, index)

    def release(self, vrange: VirtualRange) -> None:
        for index in list(vrange.pages):
            self._page_unmapped(vrange, index)
        self._unmappers.pop(vrange.address)()  # munmap: drops the pages with the reservation
        self._ranges.remove(vrange)
        vrange.handle = None

    def tensor(self, vrange: VirtualRange, dtype: torch.dtype) -> torch.Tensor:
        # The ctypes array exposes the buffer protocol; frombuffer wraps it without copying or
        # touching memory, and keeps the array alive as the tensor's owner.
        if vrange.handle is None:
            raise ValueError("the range was released")
        return torch.frombuffer(vrange.handle, dtype=torch.uint8).view(dtype)

    def close(self) -> None:
        super().close()
        self._close_fd()
