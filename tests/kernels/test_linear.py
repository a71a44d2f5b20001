"""xllm::linear: opcheck of both overloads, and the CPU weight-streaming kernel against an fp64
matmul over the row counts it takes (1-32 fp32, 1-8 bf16; 4-row blocks and their tails), odd
sizes (partial vectors, weight-row tails), bias, 3-D and strided inputs; beyond its row limit
fp32 takes oneDNN's GEMM (ATen's linear to fp32 rounding; XLLM_DENSE_GEMM=aten: ATen's), other
dtypes ATen's linear exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from xllm_compile.kernels.cpu import ensure_loaded

xllm = torch.ops.xllm


def _args(m, n, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _exact(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def test_opcheck():
    x, w, b = _args(3, 5, 7, torch.float32, True)
    torch.library.opcheck(xllm.linear.default, (x, w, b))
    torch.library.opcheck(xllm.linear.default, (x, w, None))
    # the out= overload only runs eagerly (arena programs), never under export's
    # functionalization, which rejects a custom op returning an alias of its input as ATen's do
    out = torch.empty(3, 5)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(xllm.linear.out, (x, w, b), {"out": out}, test_utils=utils)


@pytest.mark.parametrize(
    "dtype,rows", [(torch.float32, [*range(1, 18), 31, 32, 33]), (torch.bfloat16, range(1, 10))]
)
def test_streaming_kernel_matches_fp64(dtype, rows):
    assert ensure_loaded() is None
    # fp32: sums in another order than MKL, relative to the output's scale; bf16: one rounding
    # of an fp32 sum, at most 1/2 ulp of bf16 (2^-9) above the fp64 value's, plus the fp32 sum
    tol = 2e-6 if dtype == torch.float32 else 2**-8
    for m in rows:
        for n, k in [(1, 1), (3, 15), (5, 16), (67, 17), (64, 576), (300, 96)]:
            for bias in (False, True):
                x, w, b = _args(m, n, k, dtype, bias, seed=m * 1000 + n)
                y = xllm.linear(x, w, b)
                ref = _exact(x, w, b)
                assert y.dtype == dtype and y.shape == (m, n)
                scale = ref.abs().max().clamp(min=1)
                assert float((y.double() - ref).abs().max() / scale) < tol, (m, n, k, bias)
                out = torch.full((m, n), float("nan"), dtype=dtype)
                assert xllm.linear.out(x, w, b, out=out) is not None
                assert torch.equal(out, y)  # the .out overload writes the same values in place


def test_shapes_and_layouts():
    w = torch.randn(10, 64)
    x3 = torch.randn(2, 3, 64)  # [B, T, K]: 6 rows
    torch.testing.assert_close(xllm.linear(x3, w), F.linear(x3, w))
    strided = torch.randn(4, 128)[:, :64]  # rows not adjacent (a merged matmul's half)
    torch.testing.assert_close(xllm.linear(strided, w), F.linear(strided, w))
    vector = torch.randn(64)
    torch.testing.assert_close(xllm.linear(vector, w), F.linear(vector, w))
    empty = torch.randn(0, 64)
    assert xllm.linear(empty, w).shape == (0, 10)


@pytest.mark.parametrize(
    "dtype,m", [(torch.float32, 33), (torch.float32, 64), (torch.bfloat16, 9), (torch.float16, 2)]
)
def test_beyond_the_kernel_it_is_a_gemm(dtype, m):
    x, w, b = _args(m, 48, 40, dtype, True)
    out = torch.empty(m, 48, dtype=dtype)
    xllm.linear.out(x, w, b, out=out)
    if dtype == torch.float32:  # oneDNN's GEMM: another summation order, fp32 arithmetic
        for y in (xllm.linear(x, w, b), out):
            torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
            err = ((y.double() - _exact(x, w, b)).abs().max() / _exact(x, w, b).abs().max()).item()
            assert err < 1e-6
    else:
        assert torch.equal(xllm.linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(out, F.linear(x, w, b))


_ROUTE = """
import importlib, json, torch, xllm_compile.kernels
lq = importlib.import_module("xllm_compile.kernels.linear_q")
x, w = torch.randn(40, 64), torch.randn(48, 64)
qw = lq.quantize(torch.randn(64, 64), "q8_0")
with torch.profiler.profile() as p:
    torch.ops.xllm.linear(x, w, None)
    torch.ops.xllm.linear_q(x, qw, "q8_0", None)
print(json.dumps(sorted({e.name for e in p.events()})))
"""


@pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ kernels on this machine")
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
@pytest.mark.parametrize("choice", ["", "aten"])
def test_fp32_prefill_gemm_is_onednn_unless_told(choice):
    """Prefill sizes of xllm::linear (fp32) and of linear_q (its decoded weight) run oneDNN's
    matmul (MKL's sgemm runs AVX2 code on AMD CPUs, 2.3x slower on a Zen 5); XLLM_DENSE_GEMM=aten
    keeps ATen's linear. The env is read once per process: a fresh one each."""
    env = {**os.environ, "XLLM_DENSE_GEMM": choice}
    proc = subprocess.run([sys.executable, "-c", _ROUTE], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    if choice == "aten":
        assert "mkldnn::_linear_pointwise" not in names and "aten::mm" in names, names
    else:
        assert "mkldnn::_linear_pointwise" in names and "aten::mm" not in names, names


def test_mixed_dtypes_take_aten():
    x, w, _ = _args(2, 8, 16, torch.float32, False)
    with pytest.raises(RuntimeError):  # ATen's own error for mismatched dtypes
        xllm.linear(x, w.bfloat16())


def test_parallel_rows_cover_every_output():
    """Enough weight rows for several parallel tasks, and a count that is not a multiple of 4."""
    x, w, b = _args(5, 4099, 64, torch.float32, True)
    y = xllm.linear(x, w, b)
    assert torch.allclose(y.double(), _exact(x, w, b), atol=1e-4)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="the streaming kernel runs on AVX512 CPUs; ATen's GEMM elsewhere promises no such thing",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_rows_beside_it(dtype):
    """Bit for bit: a bucket pads a batch with rows, and padding must not move a real row's
    logits (every block sums through the same tree, whatever its row count)."""
    x, w, b = _args(8, 67, 96, dtype, True)
    full = xllm.linear(x, w, b)
    for m in range(1, 8):
        assert torch.equal(xllm.linear(x[:m], w, b), full[:m]), m
