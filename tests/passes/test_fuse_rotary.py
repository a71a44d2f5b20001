"""fuse_rotary: rotate-half rotary on q and k -> one xllm::rotary_embedding; a rotation whose
halves are swapped without the sign flip is left alone."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import count_ops, export, run_passes
from torch import nn

from xllm_compile.models.decoder import rotate_half

xllm, aten = torch.ops.xllm, torch.ops.aten
H, HKV, D, HIDDEN, MAX_LEN = 4, 2, 16, 32, 64


class Rope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, H * D)
        self.k_proj = nn.Linear(HIDDEN, HKV * D)
        self.v_proj = nn.Linear(HIDDEN, HKV * D)
        freqs = torch.arange(MAX_LEN)[:, None] * (1e-2 ** torch.arange(D // 2) / D)[None]
        emb = torch.cat((freqs, freqs), -1)
        self.register_buffer("cos_cached", emb.cos())
        self.register_buffer("sin_cached", emb.sin())

    def forward(self, x, positions):
        t = x.shape[0]
        cos = self.cos_cached[positions].to(x.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.sin_cached[positions].to(x.dtype).unsqueeze(1)
        q = self.q_proj(x).view(t, H, D)
        k = self.k_proj(x).view(t, HKV, D)
        v = self.v_proj(x).view(t, HKV, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # near miss: halves swapped without the negation
        v = v * cos + torch.cat((v[..., D // 2 :], v[..., : D // 2]), -1) * sin
        return q, k, v


@pytest.mark.parametrize("num_tokens", [1, 5, 7])
def test_q_and_k_fused_together(num_tokens):
    torch.manual_seed(0)
    ep = export(Rope(), torch.randn(4, HIDDEN), torch.arange(4))
    inputs = (torch.randn(num_tokens, HIDDEN), torch.randint(0, MAX_LEN, (num_tokens,)))
    [_, fuse], ctx, err = run_passes(ep, ["cleanup", "fuse_rotary"], inputs)
    assert err < 1e-5
    assert fuse["stats"]["matches"] == 1 and fuse["stats"]["details"]["unpaired"] == 0
    assert count_ops(ctx.gm, xllm.rotary_embedding) == 1
    assert count_ops(ctx.gm, aten.cat) == 1  # the near miss
    assert count_ops(ctx.gm, aten.neg) == 0


def test_lone_rotation_is_counted_not_fused():
    class One(Rope):
        def forward(self, x, positions):
            cos = self.cos_cached[positions].unsqueeze(1)
            sin = self.sin_cached[positions].unsqueeze(1)
            q = self.q_proj(x).view(x.shape[0], H, D)
            return q * cos + rotate_half(q) * sin

    ep = export(One(), torch.randn(4, HIDDEN), torch.arange(4))
    [_, fuse], ctx, _ = run_passes(
        ep, ["cleanup", "fuse_rotary"], (torch.randn(3, HIDDEN), torch.arange(3))
    )
    assert fuse["stats"]["matches"] == 0 and fuse["stats"]["details"]["unpaired"] == 1
    assert count_ops(ctx.gm, aten.neg) == 1
