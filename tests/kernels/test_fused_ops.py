"""The fused xllm:: ops: opcheck, and the CPU kernels (C++) against the reference math over
dtypes and token counts (1, odd), including the strided views the merged matmuls produce."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.kernels.cpu import ensure_loaded
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
from xllm_compile.kernels.rms_norm import rms_norm_ref
from xllm_compile.kernels.rotary_embedding import rotary_embedding_ref
from xllm_compile.kernels.silu_and_mul import silu_and_mul_ref

xllm = torch.ops.xllm
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def rel(a, b) -> float:
    if isinstance(a, tuple):
        return max(rel(x, y) for x, y in zip(a, b, strict=True))
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def cases(num_tokens: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(num_tokens)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, res, w = r(num_tokens, 40), r(num_tokens, 40), r(40)
    gate_up = r(num_tokens, 2 * 24)  # merged matmul output; gate/up are strided halves
    qkv = r(num_tokens, (4 + 2 + 2) * 8)
    q, k = qkv[:, :32].view(num_tokens, 4, 8), qkv[:, 32:48].view(num_tokens, 2, 8)
    cos, sin = r(num_tokens, 1, 8), r(num_tokens, 1, 8)
    return {
        "rms_norm": (xllm.rms_norm, rms_norm_ref, (x, w, 1e-6)),
        "fused_add_rms_norm": (xllm.fused_add_rms_norm, fused_add_rms_norm_ref, (x, res, w, 1e-5)),
        "silu_and_mul": (xllm.silu_and_mul, silu_and_mul_ref, (gate_up[:, :24], gate_up[:, 24:])),
        "rotary_embedding": (xllm.rotary_embedding, rotary_embedding_ref, (q, k, cos, sin)),
    }


def test_cpu_kernels_load():
    assert ensure_loaded() is None  # a compiler is present in CI; the fallback is tested below


@pytest.mark.parametrize(
    "name", ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"]
)
def test_opcheck(name):
    op, _, args = cases(3, torch.float32)[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_cpu_kernels_match_reference(dtype, num_tokens):
    for name, (op, ref, args) in cases(num_tokens, dtype).items():
        out, expected = op(*args), ref(*args)
        outs = out if isinstance(out, tuple) else (out,)
        exps = expected if isinstance(expected, tuple) else (expected,)
        for o, e in zip(outs, exps, strict=True):
            assert o.dtype == e.dtype and o.shape == e.shape, name
        assert rel(out, expected) <= TOL[dtype], name


def test_odd_inputs_take_the_reference_semantics():
    x, w = torch.randn(3, 10), torch.randn(10, dtype=torch.float64)  # mixed dtypes
    assert rel(xllm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) < 1e-6
    g, u = torch.randn(3, 5), torch.randn(1, 5)  # broadcast
    assert torch.allclose(xllm.silu_and_mul(g, u), silu_and_mul_ref(g, u))
