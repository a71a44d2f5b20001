"""xllm::linear_q over ggml blocks: the layouts against the gguf package (quantizers bit for bit,
dequantizers value for value), the CPU kernel against dequantize-then-matmul at many shapes, odd
row and block counts, both dtypes, with and without bias, `.out`, and on every ISA path this
machine runs (ATEN_CPU_CAPABILITY forces the lower ones, in a child process each)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT

import xllm_compile.kernels  # noqa: F401  (registers the ops)
from xllm_compile.kernels.cpu import ensure_loaded
from xllm_compile.kernels.linear_q import (
    FORMATS,
    dequantize,
    dequantize_ggml,
    linear_q_ref,
    quantize,
    quantize_ggml,
    regroup,
    ungroup,
)

GGML = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "q4_k": GT.Q4_K, "q6_k": GT.Q6_K}
# the kernel's activations are fp32, or, on the integer paths (AVX512-VNNI, AVX2), kept to ~24 bits
# a block of 32 (three int8 planes): ~1e-6 of the largest output here
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """This op's rows of a random weight: quantized (32-value formats) or random bytes with
    small fp16 scales (the K-quants, which have no quantizer here)."""
    g = torch.Generator().manual_seed(seed)
    if FORMATS[qtype][0] == 32:
        return quantize(torch.randn(n, k, generator=g) * 0.05, qtype)
    block, nbytes = FORMATS[qtype]
    raw = torch.randint(0, 256, (n, k // block, nbytes), dtype=torch.uint8, generator=g)
    scale = torch.tensor([0.002], dtype=torch.float16).view(torch.uint8)
    if qtype == "q4_k":
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:
        raw[..., 208:210] = scale
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_quantizers_are_ggmls_bit_for_bit(qtype):
    w = torch.randn(37, 96) * 0.1
    w[3, :32] = 0  # an all-zero block (scale 0)
    mine = quantize_ggml(w, qtype)
    theirs = gguf.quants.quantize(w.numpy(), GGML[qtype])
    assert np.array_equal(mine.numpy(), theirs.reshape(mine.shape))
    rows = quantize(w, qtype)
    assert torch.equal(ungroup(rows, qtype), mine)
    assert torch.equal(regroup(mine, qtype), rows)
    assert not torch.equal(rows, mine)  # regrouped: scales first, then the values


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_dequantize_is_the_gguf_packages(qtype):
    rows = random_blocks(qtype, 9, 512)
    theirs = gguf.quants.dequantize(ungroup(rows, qtype).numpy(), GGML[qtype]).reshape(9, 512)
    assert np.array_equal(dequantize(rows, qtype).numpy(), theirs)
    assert np.array_equal(dequantize_ggml(ungroup(rows, qtype), qtype).numpy(), theirs)


def test_int4_search_lowers_the_error():
    w = torch.randn(64, 256) * 0.05
    plain = (dequantize(quantize(w, "q4_1"), "q4_1") - w).pow(2).sum()
    searched = (dequantize(quantize(w, "q4_1", search=True), "q4_1") - w).pow(2).sum()
    assert searched < 0.95 * plain


SHAPES = {  # (N, K): odd row counts, an odd number of 32-blocks (K = 96), SmolLM2's K
    32: [(1, 32), (7, 96), (33, 160), (67, 576), (130, 1536)],
    256: [(3, 256), (41, 512), (67, 768)],
}


def _check_kernel(qtype, n, k, rows, dtype, bias):
    q = random_blocks(qtype, n, k, seed=n + k)
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = torch.ops.xllm.linear_q(x, q, qtype, b)
    ref = linear_q_ref(x, q, qtype, b)
    assert y.dtype == dtype and y.shape == (rows, n)
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < TOL[dtype], (qtype, n, k, rows, dtype, err)


@pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ kernels on this machine")
@pytest.mark.parametrize("qtype", list(FORMATS))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 40])
def test_kernel_matches_dequantize_then_matmul(qtype, rows):
    for n, k in SHAPES[FORMATS[qtype][0]]:
        _check_kernel(qtype, n, k, rows, torch.float32, bias=rows % 2 == 1)
    n, k = SHAPES[FORMATS[qtype][0]][1]
    _check_kernel(qtype, n, k, rows, torch.bfloat16, bias=True)


@pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ kernels on this machine")
@pytest.mark.parametrize("qtype", list(FORMATS))
@pytest.mark.parametrize("k", [512, 576])  # 576: SmolLM2's width, a group of 16 blocks and of 2
def test_out_overload_and_rows_independent_of_the_batch(qtype, k):
    if k % FORMATS[qtype][0]:
        k = 768  # the K-quants' blocks are 256 wide: three of them
    q = random_blocks(qtype, 45, k)
    x = torch.randn(7, k)  # odd: rows taken in pairs (AVX2 q8_0) and one left over
    out = torch.empty(7, 45)
    got = torch.ops.xllm.linear_q.out(x, q, qtype, None, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, linear_q_ref(x, q, qtype), rtol=0, atol=2e-4 * out.abs().max())
    # a row's result does not depend on the other rows of its call (bucket padding)
    for i in (2, 3, 6):
        assert torch.equal(torch.ops.xllm.linear_q(x[i : i + 1], q, qtype)[0], out[i])
    # a 3-D activation keeps its leading dims
    assert torch.ops.xllm.linear_q(x[:6].reshape(2, 3, k), q, qtype).shape == (2, 3, 45)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()[2:]}
    except OSError:
        return set()


@pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ kernels on this machine")
@pytest.mark.skipif(
    not {"avx512_vnni", "gfni"} <= _cpu_flags(), reason="no AVX512-VNNI + GFNI on this CPU"
)
def test_gfni_unpacking_is_bit_for_bit_the_shift_and_mask():
    """The VNNI path unpacks the high nibbles with one GFNI affine op where the CPU has it;
    XLLM_GFNI=0 (a child process) takes the shift-and-mask: the outputs must be identical."""
    script = textwrap.dedent(
        """
        import hashlib, sys, torch
        sys.path.insert(0, sys.argv[1])
        import xllm_compile.kernels
        from test_linear_q import random_blocks
        h = hashlib.sha256()
        for qtype in ("q4_0", "q4_1"):
            for n, k in ((45, 512), (61, 576), (33, 1536), (7, 96)):
                q = random_blocks(qtype, n, k, seed=n)
                for rows in (1, 3, 8):
                    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k + rows))
                    h.update(torch.ops.xllm.linear_q(x, q, qtype).numpy().tobytes())
        print(h.hexdigest())
        """
    )
    here = os.path.dirname(__file__)
    digests = []
    for flag in ("1", "0"):
        proc = subprocess.run(
            [sys.executable, "-c", script, here],
            env={**os.environ, "XLLM_GFNI": flag},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.append(proc.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


@pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ kernels on this machine")
@pytest.mark.parametrize(
    "capability,activations",
    [("avx2", "int"), ("avx2", "fp32"), ("default", "fp32"), ("avx512", "fp32")],
)
def test_lower_isa_paths(capability, activations):
    """ATEN_CPU_CAPABILITY=avx2 runs the AVX2 integer path (q8_0 / q4_0 / q4_1 on int8 activation
    planes; the K-quants decoded) or, with XLLM_QUANT_ACTIVATIONS=fp32, the AVX2 decoders; =default
    the plain C++ ones; on AVX512, XLLM_QUANT_ACTIVATIONS=fp32 the blocks decoded in registers
    without VNNI (an AVX512 CPU without it runs that path). Each also keeps a row's result
    independent of its call's other rows (a batch-1 step takes the four-row kernel)."""
    have = torch.backends.cpu.get_cpu_capability()
    if capability == "avx2" and have not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    if capability == "avx512" and have != "AVX512":
        pytest.skip("this CPU has no AVX512")
    script = textwrap.dedent(
        """
        import torch, sys
        sys.path.insert(0, sys.argv[1])
        from test_linear_q import FORMATS, SHAPES, _check_kernel, _outlier_rows, random_blocks
        from xllm_compile.kernels.linear_q import linear_q_ref
        assert torch.backends.cpu.get_cpu_capability() == sys.argv[2].upper(), sys.argv[2]
        for qtype in FORMATS:
            for n, k in SHAPES[FORMATS[qtype][0]][:4]:
                for rows in (1, 3, 5, 17):
                    _check_kernel(qtype, n, k, rows, torch.float32, bias=True)
            k = 576 if FORMATS[qtype][0] == 32 else 768
            for k in (k, 1536 if k == 576 else k):
                q = random_blocks(qtype, 45, k)
                x = _outlier_rows(k, 6, seed=k)  # rows with and without outlier channels
                out = torch.ops.xllm.linear_q(x, q, qtype)
                ref = linear_q_ref(x, q, qtype)
                assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-4
                for i in range(6):
                    assert torch.equal(torch.ops.xllm.linear_q(x[i : i + 1], q, qtype)[0], out[i])
        print("ok")
        """
    )
    # the opt-in third-digit rule on (the AVX2 planes follow it too): rows with and without
    # outliers below
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "XLLM_LOW_DIGIT_RATIO": "16"}
    env.pop("XLLM_QUANT_ACTIVATIONS", None)
    if activations == "fp32":
        env["XLLM_QUANT_ACTIVATIONS"] = "fp32"
    here = os.path.dirname(__file__)
    proc = subprocess.run(
        [sys.executable, "-c", script, here, capability],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def _outlier_rows(k: int, rows: int, seed: int) -> torch.Tensor:
    """Activation rows like a real model's: most values ~N(0, 1), and in the even rows one value
    of 120 in every group of 16 blocks (an outlier channel: far above 16x the row's rms)."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[::2, 5::512] = 120.0
    return x


@pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ kernels on this machine")
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512" or "avx512_vnni" not in _cpu_flags(),
    reason="the integer path with three digits is AVX512-VNNI's",
)
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_third_digits_kept_only_for_outlier_groups(qtype):
    """Opt-in (torch.ops.xllm.linear_q_low_digits / XLLM_LOW_DIGIT_RATIO; 0, the default, keeps
    every digit): a group's third activation digits kept only where a block holds a value above
    16x the row's rms. Rows with an outlier in every group give the same bits either way, rows
    without one move by about 1e-5 of the largest output (two digits), both stay well inside the
    reference's tolerance, and a row's result still does not depend on the other rows of its
    call."""
    ratio = torch.ops.xllm.linear_q_low_digits
    assert ratio() == 0.0  # off unless asked for
    for n, k in ((67, 576), (45, 1536)):
        q = random_blocks(qtype, n, k, seed=k)
        x = _outlier_rows(k, 8, seed=n)
        ref = linear_q_ref(x, q, qtype)
        every = torch.ops.xllm.linear_q(x, q, qtype)
        ratio(16.0)
        try:
            ruled = torch.ops.xllm.linear_q(x, q, qtype)
            singles = [torch.ops.xllm.linear_q(x[i : i + 1], q, qtype)[0] for i in range(8)]
            threes = [torch.ops.xllm.linear_q(x[i - 1 : i + 2], q, qtype)[1] for i in (1, 2, 5)]
        finally:
            ratio(0.0)
        scale = ref.abs().amax(-1)
        assert torch.equal(ruled[::2], every[::2])  # outlier rows: all three digits kept
        moved = ((ruled[1::2] - every[1::2]).abs().amax(-1) / scale[1::2]).max().item()
        assert 0 < moved < 1e-4, moved  # the others lost their third digits, and little else
        for y in (ruled, every):
            err = ((y - ref).abs().amax(-1) / scale).max().item()
            assert err < 2e-4, err
        # three digits on the outlier rows: ~1e-6 of their outputs; two on the others: ~1e-5
        assert ((every - ref).abs().amax(-1) / scale).max().item() < 1e-5
        for i in range(8):  # batch 1 (the four-row kernel) against the batch of 8 (rows 4 a time)
            assert torch.equal(singles[i], ruled[i])
        # batches of 3, rows with and without outliers
        for y, i in zip(threes, (1, 2, 5), strict=True):
            assert torch.equal(y, ruled[i])
