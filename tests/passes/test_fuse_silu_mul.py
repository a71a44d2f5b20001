"""fuse_silu_mul: silu(gate) * up -> xllm::silu_and_mul; a gelu MLP left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import count_ops, export, run_passes, tolerance
from torch import nn

xllm, aten = torch.ops.xllm, torch.ops.aten


class TwoMLPs(nn.Module):
    def __init__(self, hidden: int = 32, inter: int = 48) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(hidden, inter), nn.Linear(hidden, inter)
        self.g2, self.u2 = nn.Linear(hidden, inter), nn.Linear(hidden, inter)

    def forward(self, x):
        swiglu = F.silu(self.gate(x)) * self.up(x)
        geglu = F.gelu(self.g2(x)) * self.u2(x)  # near miss: another activation
        return swiglu, geglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 6, 9])
def test_silu_mul_fused(dtype, num_tokens):
    torch.manual_seed(0)
    ep = export(TwoMLPs().to(dtype), torch.randn(4, 32, dtype=dtype))
    inputs = (torch.randn(num_tokens, 32, dtype=dtype),)
    [_, fuse], ctx, err = run_passes(ep, ["cleanup", "fuse_silu_mul"], inputs, dtype)
    assert err < tolerance(dtype)
    assert fuse["stats"]["matches"] == 1
    assert count_ops(ctx.gm, xllm.silu_and_mul) == 1
    assert count_ops(ctx.gm, aten.silu) == 0
    assert count_ops(ctx.gm, aten.gelu) == 1 and count_ops(ctx.gm, aten.mul) == 1


def test_silu_read_twice_is_left_alone():
    class Twice(nn.Module):
        def forward(self, g, u):
            s = F.silu(g)
            return s * u, s + 1

    ep = export(Twice(), torch.randn(4, 8), torch.randn(4, 8))
    [_, fuse], _, _ = run_passes(
        ep, ["cleanup", "fuse_silu_mul"], (torch.randn(2, 8), torch.randn(2, 8))
    )
    assert fuse["stats"]["matches"] == 0
