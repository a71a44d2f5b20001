"""CUDA page pool on the driver's virtual memory API (cuda-python, extra `[cuda]`): a physical
page is one cuMemCreate allocation, a range is one cuMemAddressReserve, and cuMemMap +
cuMemSetAccess put a page at an offset (an alias maps one allocation's handle at a second
address). Importable without cuda-python; constructing the pool without it raises
BackendUnavailableError.

Dropping the pool gives its memory back to the driver, as `close()` does: a finalizer
(`_release_all`, run when the pool is garbage collected or at interpreter exit) unmaps every
page still mapped, frees every reserved range and releases every physical allocation. Tensors
viewing its ranges must be gone by then, as for `release()`.
"""

from __future__ import annotations

import weakref

import torch

from xllm_compile.errors import BackendUnavailableError, ConfigError
from xllm_compile.runtime.page_pool import PagePool, VirtualRange, round_up

try:  # cuda-python >= 12.6 ships the bindings as cuda.bindings; older ones as cuda.cuda
    from cuda.bindings import driver as cu
except ImportError:  # pragma: no cover - depends on the installed cuda-python
    try:
        from cuda import cuda as cu
    except ImportError:
        cu = None


def _check(result):
    """cuda-python returns (CUresult, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver call failed: {name.decode() if name else err}")
    return values[0] if len(values) == 1 else values


class _CudaArray:
    """The smallest object torch.as_tensor accepts as device memory without copying."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


class CudaPagePool(PagePool):
    """Pages of `page_size` bytes (a multiple of the driver's granularity, 2 MiB on current GPUs)
    on device `index`. Pages are created on first map and kept until `close()`."""

    def __init__(self, page_size: int, num_pages: int, index: int = 0) -> None:
        if cu is None:
            raise BackendUnavailableError(
                "page-mapped memory on cuda needs cuda-python: pip install 'xllm-compile[cuda]'"
            )
        if not torch.cuda.is_available():
            raise BackendUnavailableError("no CUDA device is visible to torch here")
        self.device = torch.device("cuda", index)
        torch.cuda.init()
        torch.empty(1, device=self.device)  # makes torch's primary context current
        _check(cu.cuInit(0))
        self._prop = _allocation_prop(index)
        granularity = self.granularity()
        if page_size <= 0 or page_size % granularity:
            raise ConfigError(
                f"page size {page_size} is not a multiple of the CUDA granularity ({granularity})"
            )
        super().__init__(page_size, num_pages)
        self._handles: dict[int, object] = {}  # physical page -> CUmemGenericAllocationHandle
        # the memory goes back to the driver when the pool is dropped, not only at close()
        self._finalizer = weakref.finalize(
            self, _release_all, cu, self.device, self.page_size, self._ranges, self._handles
        )
        self._access = cu.CUmemAccessDesc()
        self._access.location = self._prop.location
        self._access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

    def granularity(self) -> int:
        option = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        return int(_check(cu.cuMemGetAllocationGranularity(self._prop, option)))

    def reserve(self, nbytes: int) -> VirtualRange:
        nbytes = round_up(max(nbytes, 1), self.page_size)
        ptr = _check(cu.cuMemAddressReserve(nbytes, self.page_size, 0, 0))
        vrange = VirtualRange(int(ptr), nbytes)
        self._ranges.append(vrange)
        return vrange

    def map(self, vrange: VirtualRange, index: int, page: int | None = None) -> int:
        # an alias (`page` given) maps the same allocation handle at a second address
        page = self._take_page(vrange, index, page)
        addr = vrange.address + index * self.page_size
        try:
            if page not in self._handles:
                self._handles[page] = _check(cu.cuMemCreate(self.page_size, self._prop, 0))
            _check(cu.cuMemMap(addr, self.page_size, 0, self._handles[page], 0))
            _check(cu.cuMemSetAccess(addr, self.page_size, [self._access], 1))
        except RuntimeError:
            self._map_failed(page)
            raise
        self._page_mapped(vrange, index, page)
        return page

    def unmap(self, vrange: VirtualRange, index: int) -> None:
        if index not in vrange.pages:
            raise ValueError(f"page {index} of the range is not mapped")
        # Kernels still queued may read the page: finish them before it goes elsewhere.
        torch.cuda.synchronize(self.device)
        _check(cu.cuMemUnmap(vrange.address + index * self.page_size, self.page_size))
        self._page_unmapped(vrange, index)

    def release(self, vrange: VirtualRange) -> None:
        torch.cuda.synchronize(self.device)
        for index in list(vrange.pages):
            _check(cu.cuMemUnmap(vrange.address + index * self.page_size, self.page_size))
            self._page_unmapped(vrange, index)
        _check(cu.cuMemAddressFree(vrange.address, vrange.nbytes))
        self._ranges.remove(vrange)

    def tensor(self, vrange: VirtualRange, dtype: torch.dtype) -> torch.Tensor:
        # Seen on torch 2.11 + H100: as_tensor accepts the range with its first page unmapped.
        flat = torch.as_tensor(_CudaArray(vrange.address, vrange.nbytes), device=self.device)
        return flat.view(dtype)

    def close(self) -> None:
        self._finalizer()  # idempotent: a later drop finds nothing left


def _release_all(driver, device, page_size: int, ranges: list, handles: dict) -> None:
    """Unmap every mapped page, free every range's address space, release every allocation
    (the pool's close, and its finalizer). Takes the driver module so that the sequence of
    calls is testable without a GPU (tests/runtime/test_page_pool.py)."""
    if ranges and torch.cuda.is_available():
        torch.cuda.synchronize(device)  # queued kernels may still read the pages
    for vrange in list(ranges):
        for index in list(vrange.pages):
            _call(driver, driver.cuMemUnmap(vrange.address + index * page_size, page_size))
        vrange.pages.clear()
        _call(driver, driver.cuMemAddressFree(vrange.address, vrange.nbytes))
    ranges.clear()
    for handle in handles.values():
        _call(driver, driver.cuMemRelease(handle))
    handles.clear()


def _call(driver, result):
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed while releasing the page pool: {err}")


def _allocation_prop(index: int):
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    return prop
