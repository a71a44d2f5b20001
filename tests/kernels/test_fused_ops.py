"""The fused xllm:: ops: opcheck, and the CPU kernels (C++) against the reference math over
dtypes and token counts (1, odd, and enough rows to run on several threads), including the
strided views the merged matmuls produce and both rotary pairings."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.kernels.cpu import ensure_loaded
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
from xllm_compile.kernels.rms_norm import rms_norm_ref
from xllm_compile.kernels.rotary_embedding import rotary_embedding_ref
from xllm_compile.kernels.silu_and_mul import silu_and_mul_ref

xllm = torch.ops.xllm
# fp32: relative to the largest output (the norms sum in another order); reduced dtypes: in
# units of the last place of each expected value (the kernels round where the reference rounds)
TOL = {torch.float32: 1e-6, torch.bfloat16: 1.0, torch.float16: 1.0}


def error(a, b, dtype) -> float:
    if isinstance(a, tuple):
        return max(error(x, y, dtype) for x, y in zip(a, b, strict=True))
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (a.float() - b.float()).abs()
    if dtype == torch.float32:
        return float(diff.max() / b.float().abs().max())
    finfo = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(b.float().abs().clamp(min=finfo.smallest_normal)))
    return float((diff / (finfo.eps * torch.exp2(exponent))).max())  # in ulps


def cases(num_tokens: int, dtype: torch.dtype, hidden: int = 40, inter: int = 24, d: int = 8):
    """name -> (op, reference, args); odd sizes so every loop has a partial vector."""
    g = torch.Generator().manual_seed(num_tokens)
    r = lambda *s: (4 * torch.randn(*s, generator=g)).to(dtype)  # noqa: E731
    x, res, w = r(num_tokens, hidden), r(num_tokens, hidden), r(hidden)
    gate_up = r(num_tokens, 2 * inter)  # merged matmul output; gate/up are strided halves
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    qkv = r(num_tokens, (4 + 2 + 2) * d)
    q, k = qkv[:, : 4 * d].view(num_tokens, 4, d), qkv[:, 4 * d : 6 * d].view(num_tokens, 2, d)
    cos, sin = r(num_tokens, 1, d), r(num_tokens, 1, d)
    cos_half, sin_half = cos[..., : d // 2], sin[..., : d // 2]  # one angle per pair
    rotary = (xllm.rotary_embedding, rotary_embedding_ref)
    return {
        "rms_norm": (xllm.rms_norm, rms_norm_ref, (x, w, 1e-6)),
        "fused_add_rms_norm": (xllm.fused_add_rms_norm, fused_add_rms_norm_ref, (x, res, w, 1e-5)),
        "silu_and_mul": (xllm.silu_and_mul, silu_and_mul_ref, (gate, up)),
        "rotary_embedding": (*rotary, (q, k, cos, sin)),
        "rotary_interleaved": (*rotary, (q, k, cos, sin, False)),
        "rotary_half_width": (*rotary, (q, k, cos_half, sin_half)),
        "rotary_interleaved_half_width": (*rotary, (q, k, cos_half, sin_half, False)),
    }


NAMES = list(cases(1, torch.float32))


def test_cpu_kernels_load():
    assert ensure_loaded() is None  # a compiler is present in CI; the fallback is tested below


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name):
    op, _, args = cases(3, torch.float32)[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 1100])  # 1100: rows split across threads
def test_cpu_kernels_match_reference(dtype, num_tokens):
    for name, (op, ref, args) in cases(num_tokens, dtype).items():
        assert error(op(*args), ref(*args), dtype) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_match_reference_at_model_sizes(dtype):
    """Qwen2.5-0.5B's widths: hidden 896, intermediate 4864, head_dim 64."""
    for name, (op, ref, args) in cases(9, dtype, hidden=896, inter=4864, d=64).items():
        assert error(op(*args), ref(*args), dtype) <= TOL[dtype], name


def test_silu_matches_aten_at_the_extremes():
    """The kernel's inlined exp is Sleef's: same overflow/underflow edges as ATen's silu."""
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 88.7, 89.0, -87.0, -104.0]
    g = torch.cat([torch.linspace(-120, 120, 4000), torch.tensor(special)]).view(1, -1)
    out, expected = xllm.silu_and_mul(g, torch.ones_like(g)), torch.nn.functional.silu(g)
    assert torch.equal(out.isnan(), expected.isnan())
    assert error(out.nan_to_num(), expected.nan_to_num(), torch.float32) <= TOL[torch.float32]


def test_odd_inputs_take_the_reference_semantics():
    x, w = torch.randn(3, 10), torch.randn(10, dtype=torch.float64)  # mixed dtypes
    assert error(xllm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), torch.float32) < 1e-6
    g, u = torch.randn(3, 5), torch.randn(1, 5)  # broadcast
    assert torch.allclose(xllm.silu_and_mul(g, u), silu_and_mul_ref(g, u))
    g3 = torch.randn(2, 3, 5).transpose(0, 1)  # 3-D, not contiguous
    assert torch.allclose(xllm.silu_and_mul(g3, g3), silu_and_mul_ref(g3, g3))
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    for is_neox in (True, False):
        for width in (8, 4, 1):  # full, one angle per pair, broadcast
            cos, sin = (torch.randn(3, 1, width, dtype=torch.float64) for _ in range(2))
            out = xllm.rotary_embedding(q, k, cos, sin, is_neox)
            expected = rotary_embedding_ref(q, k, cos, sin, is_neox)
            assert error(out, expected, torch.float64) < 1e-12, (is_neox, width)
