"""The page pool on each backend: data survives map/unmap/remap (written through one view, read
through another), counters, exhaustion and argument errors. CUDA cases skip without a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from xllm_compile.errors import BackendUnavailableError, ConfigError
from xllm_compile.runtime.page_pool import PoolExhaustedError, budget_bytes, make_page_pool

HAS_CUDA_VMM = torch.cuda.is_available() and importlib.util.find_spec("cuda") is not None
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not HAS_CUDA_VMM, reason="no CUDA device or cuda-python")
    ),
]
CPU_PAGE = 4096
CUDA_PAGE = 2 << 20


@pytest.fixture(params=DEVICES)
def pool(request):
    page = CPU_PAGE if request.param == "cpu" else CUDA_PAGE
    pool = make_page_pool(request.param, page, 4)
    yield pool
    pool.close()


def floats(pool) -> int:
    return pool.page_size // 4


def test_write_through_one_range_read_through_another_after_remap(pool):
    a, b = pool.reserve(3 * pool.page_size), pool.reserve(2 * pool.page_size)
    n = floats(pool)
    pool.map(a, 0)
    pool.map(a, 2)
    ta = pool.tensor(a, torch.float32)
    ta[:n] = 1.0
    ta[2 * n :] = torch.arange(n, dtype=torch.float32, device=ta.device)
    page = a.pages[2]
    pool.unmap(a, 2)
    assert pool.map(b, 1) == page  # the freed page is the next one handed out
    tb = pool.tensor(b, torch.float32)
    assert torch.equal(tb[n:].cpu(), torch.arange(n, dtype=torch.float32))  # same bytes, new home
    assert torch.equal(ta[:n].cpu(), torch.ones(n))  # the page left in place is untouched
    tb[n:] = 7.0  # and writes go both ways: map it back into a, see them there
    pool.unmap(b, 1)
    pool.map(a, 1)
    assert torch.equal(ta[n : 2 * n].cpu(), torch.full((n,), 7.0))


def test_views_of_any_dtype_share_memory(pool):
    r = pool.reserve(pool.page_size)
    pool.map(r, 0)
    as_f32, as_i32 = pool.tensor(r, torch.float32), pool.tensor(r, torch.int32)
    as_bf16 = pool.tensor(r, torch.bfloat16)
    values = torch.tensor([1.0, 2.0, -3.5])
    as_f32[:3] = values
    assert as_f32.data_ptr() == as_i32.data_ptr() == as_bf16.data_ptr() == r.address
    assert torch.equal(as_i32[:3].cpu(), values.view(torch.int32))
    assert as_bf16.numel() == pool.page_size // 2


def test_counters_and_exhaustion(pool):
    r = pool.reserve(8 * pool.page_size)
    for i in range(4):
        pool.map(r, i)
    with pytest.raises(PoolExhaustedError):
        pool.map(r, 4)
    r.used_bytes = 3 * pool.page_size + 100
    s = pool.stats()
    assert (s.pages_total, s.pages_free, s.pages_mapped) == (4, 0, 4)
    assert (s.map_calls, s.unmap_calls) == (4, 0)
    assert s.bytes_wasted == pool.page_size - 100
    pool.unmap(r, 3)
    pool.release(r)  # returns the other three
    s = pool.stats()
    assert (s.pages_free, s.pages_mapped, s.unmap_calls, s.bytes_mapped) == (4, 0, 4, 0)


def test_bad_indices_raise_and_change_nothing(pool):
    r = pool.reserve(2 * pool.page_size)
    pool.map(r, 0)
    with pytest.raises(ValueError, match="already mapped"):
        pool.map(r, 0)
    with pytest.raises(ValueError, match="outside"):
        pool.map(r, 2)
    with pytest.raises(ValueError, match="not mapped"):
        pool.unmap(r, 1)
    assert pool.num_free == 3 and r.pages.keys() == {0}


def test_page_size_must_be_a_multiple_of_the_os_page():
    with pytest.raises(ConfigError, match="multiple of the OS page size"):
        make_page_pool("cpu", CPU_PAGE + 512, 4)


def test_budget_is_bytes_or_a_fraction_of_free_memory():
    assert budget_bytes(1 << 20, "cpu") == 1 << 20
    assert 0 < budget_bytes(0.01, "cpu") < budget_bytes(0.02, "cpu")
    with pytest.raises(ConfigError):
        budget_bytes(1.5, "cpu")
    with pytest.raises(ConfigError):
        budget_bytes(0, "cpu")


def test_npu_slot_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="contiguous"):
        make_page_pool("npu", CPU_PAGE, 4)


@pytest.mark.skipif(HAS_CUDA_VMM, reason="checks the error raised without cuda-python or a GPU")
def test_cuda_without_cuda_python_or_gpu_is_a_clear_error():
    with pytest.raises(BackendUnavailableError):
        make_page_pool("cuda", CUDA_PAGE, 4)


def _mappings_of(inode: int) -> int:
    """Lines of /proc/self/maps mapping the file with this inode (the memfd)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if len(parts := line.split()) > 4 and parts[4] == str(inode))


def test_dropping_a_pool_gives_its_memory_back():
    """Without close(): the last reference going frees the mappings, the ranges and the memfd
    (the same contract the CUDA pool's finalizer keeps, below)."""
    import gc
    import os

    pool = make_page_pool("cpu", CPU_PAGE, 8)
    vrange = pool.reserve(4 * CPU_PAGE)
    for i in range(3):
        pool.map(vrange, i)
    pool.tensor(vrange, torch.float32)[: 3 * floats(pool)] = 1.0  # the pages take memory
    fd = pool.fd
    inode = os.fstat(fd).st_ino
    assert _mappings_of(inode) >= 1
    del pool, vrange
    gc.collect()
    assert _mappings_of(inode) == 0
    with pytest.raises(OSError):
        os.fstat(fd)  # the memfd, and with it the pages, is gone


class _FakeDriver:
    """cuda-python's driver module at the boundary: records the calls, returns CUDA_SUCCESS."""

    class CUresult:
        CUDA_SUCCESS = 0

    def __init__(self) -> None:
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            return (0,)

        return call


def test_the_cuda_pools_release_unmaps_frees_and_releases_everything():
    from xllm_compile.runtime.page_pool import VirtualRange
    from xllm_compile.runtime.page_pool_cuda import _release_all

    page = CUDA_PAGE
    a = VirtualRange(1 << 40, 4 * page, pages={0: 3, 2: 1})
    b = VirtualRange(1 << 41, 2 * page, pages={1: 3})  # page 3 aliased into both ranges
    ranges, handles = [a, b], {1: "h1", 3: "h3", 5: "h5"}  # 5: made once, mapped nowhere now
    driver = _FakeDriver()
    _release_all(driver, None, page, ranges, handles)
    assert driver.calls == [
        ("cuMemUnmap", a.address, page),
        ("cuMemUnmap", a.address + 2 * page, page),
        ("cuMemAddressFree", a.address, a.nbytes),
        ("cuMemUnmap", b.address + page, page),
        ("cuMemAddressFree", b.address, b.nbytes),
        ("cuMemRelease", "h1"),
        ("cuMemRelease", "h3"),
        ("cuMemRelease", "h5"),
    ]
    assert ranges == [] and handles == {} and a.pages == {}
    _release_all(driver, None, page, ranges, handles)  # a second time (close, then the drop)
    assert len(driver.calls) == 8
