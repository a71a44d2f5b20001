"""fuse_rms_norm: RMSNorm and residual add + RMSNorm fused; an RMSNorm without eps left alone."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import count_ops, export, run_passes, tolerance
from torch import nn

from xllm_compile.models.decoder import RMSNorm

xllm, aten = torch.ops.xllm, torch.ops.aten


class NormBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.first = RMSNorm(dim, 1e-6)
        self.second = RMSNorm(dim, 1e-5)
        for norm in (self.first, self.second):
            norm.weight.data.uniform_(0.5, 1.5)

    def forward(self, x, h):
        a = self.first(x)  # plain RMSNorm
        residual = x + h
        b = self.second(residual)  # residual add + RMSNorm; the sum is used again below
        # near miss: no eps inside the rsqrt
        c = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        return a, b, residual * 2, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 7])
def test_rms_norm_and_fused_add(dtype, num_tokens):
    torch.manual_seed(0)
    mod = NormBlock(48).to(dtype)
    ep = export(mod, torch.randn(4, 48, dtype=dtype), torch.randn(4, 48, dtype=dtype))
    inputs = (torch.randn(num_tokens, 48, dtype=dtype), torch.randn(num_tokens, 48, dtype=dtype))
    [cleanup, fuse], ctx, err = run_passes(ep, ["cleanup", "fuse_rms_norm"], inputs, dtype)
    assert err < tolerance(dtype)
    gm = ctx.gm
    assert fuse["stats"]["matches"] == 2
    assert fuse["stats"]["replaced"] == {"rms_norm": 1, "fused_add_rms_norm": 1}
    assert count_ops(gm, xllm.rms_norm) == 1
    assert count_ops(gm, xllm.fused_add_rms_norm) == 1
    assert count_ops(gm, aten.rsqrt) == 1  # the near miss is untouched
    assert count_ops(gm, aten.add.Tensor) == 0  # the residual add went into the fused op


def test_qk_norm_on_heads_is_fused():
    """RMSNorm over the last dim of a [T, H, D] tensor (Qwen3's q/k norm) is the same op."""
    mod = RMSNorm(16, 1e-6)
    ep = export(mod, torch.randn(3, 4, 16))
    _, ctx, err = run_passes(ep, ["cleanup", "fuse_rms_norm"], (torch.randn(1, 4, 16),))
    assert err < 1e-5 and count_ops(ctx.gm, xllm.rms_norm) == 1


def test_norm_over_another_dim_is_left_alone():
    class Dim0(nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)

    ep = export(Dim0(), torch.randn(5, 8))
    [_, fuse], ctx, _ = run_passes(ep, ["cleanup", "fuse_rms_norm"], (torch.randn(3, 8),))
    assert fuse["stats"]["matches"] == 0 and count_ops(ctx.gm, xllm.rms_norm) == 0
