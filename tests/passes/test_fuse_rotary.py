"""fuse_rotary: rotary on q and k -> one xllm::rotary_embedding, rotate-half (Llama) or
interleaved (GPT-J/Cohere: stack of the even/odd pairs; GLM: the pair products on D/2 tables).
Near misses are left alone: halves swapped without the sign flip, a sign on the wrong element,
a stride other than 2."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import count_ops, export, run_passes, tolerance
from torch import nn

from xllm_compile.models.decoder import rotate_half

xllm, aten = torch.ops.xllm, torch.ops.aten
H, HKV, D, HIDDEN, MAX_LEN = 4, 2, 16, 32, 64


class Rope(nn.Module):
    """q, k, v projections and [MAX_LEN, D/2] angle tables, gathered by position."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, H * D)
        self.k_proj = nn.Linear(HIDDEN, HKV * D)
        self.v_proj = nn.Linear(HIDDEN, HKV * D)
        freqs = torch.arange(MAX_LEN)[:, None] * (1e-2 ** torch.arange(D // 2) / D)[None]
        self.register_buffer("cos_half", freqs.cos())  # [MAX_LEN, D/2]: one angle per pair
        self.register_buffer("sin_half", freqs.sin())
        self.register_buffer("cos_cached", torch.cat((freqs, freqs), -1).cos())  # rotate-half
        self.register_buffer("sin_cached", torch.cat((freqs, freqs), -1).sin())

    def qkv(self, x):
        t = x.shape[0]
        q = self.q_proj(x).view(t, H, D)  # [T, H, D]
        return q, self.k_proj(x).view(t, HKV, D), self.v_proj(x).view(t, HKV, D)

    def tables(self, positions, dtype, layout: str):
        if layout == "rotate_half":
            cos, sin = self.cos_cached[positions], self.sin_cached[positions]  # [T, D]
        else:
            cos, sin = self.cos_half[positions], self.sin_half[positions]  # [T, D/2]
        if layout == "interleaved":  # each angle twice, next to each other: [T, D]
            cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)  # [T, 1, D or D/2]

    def forward(self, x, positions):
        q, k, v = self.qkv(x)
        cos, sin = self.tables(positions, x.dtype, "rotate_half")
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # near miss: halves swapped without the negation
        v = v * cos + torch.cat((v[..., D // 2 :], v[..., : D // 2]), -1) * sin
        return q, k, v


def every_two(x):  # GPT-J's rotate_every_two
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class GPTJ(Rope):
    def forward(self, x, positions):
        q, k, v = self.qkv(x)
        cos, sin = self.tables(positions, x.dtype, "interleaved")
        q = q * cos + every_two(q) * sin
        k = k * cos + every_two(k) * sin
        # near miss: the sign on the other element of each pair
        v1, v2 = v[..., ::2], v[..., 1::2]
        v = v * cos + torch.stack((v2, -v1), dim=-1).flatten(-2) * sin
        return q, k, v


def pairwise(x, cos, sin):  # GLM's form: the rotated pairs written back interleaved
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)


class GLM(Rope):
    def forward(self, x, positions):
        q, k, v = self.qkv(x)
        cos, sin = self.tables(positions, x.dtype, "pairs")  # [T, 1, D/2]
        # near miss: the halves (stride 1) where the pairs (stride 2) belong
        v1, v2 = v[..., : D // 2], v[..., D // 2 :]
        v = torch.stack((v1 * cos - v2 * sin, v2 * cos + v1 * sin), -1).flatten(-2)
        return pairwise(q, cos, sin), pairwise(k, cos, sin), v


def fuse(module, num_tokens, dtype=torch.float32):
    torch.manual_seed(0)
    ep = export(module.to(dtype), torch.randn(4, HIDDEN, dtype=dtype), torch.arange(4))
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, HIDDEN, generator=g).to(dtype)
    inputs = (x, torch.randint(0, MAX_LEN, (num_tokens,), generator=g))
    [_, record], ctx, err = run_passes(ep, ["cleanup", "fuse_rotary"], inputs, dtype)
    [node] = [n for n in ctx.gm.graph.nodes if n.target == xllm.rotary_embedding.default]
    return record["stats"], ctx.gm, node, err


@pytest.mark.parametrize("num_tokens", [1, 5, 7])
def test_rotate_half_q_and_k_fused_together(num_tokens):
    stats, gm, node, err = fuse(Rope(), num_tokens)
    assert err < 1e-5
    assert stats["matches"] == 1 and stats["details"]["unpaired"] == 0
    assert stats["replaced"] == {"rotary_embedding": 1}
    assert len(node.args) == 4  # is_neox left at its default: the schema before the flag
    assert count_ops(gm, aten.cat) == 1  # the near miss
    assert count_ops(gm, aten.neg) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 7])
def test_interleaved_q_and_k_fused_together(dtype, num_tokens):
    stats, gm, node, err = fuse(GPTJ(), num_tokens, dtype)
    assert err < tolerance(dtype)
    assert stats["matches"] == 1 and stats["details"]["unpaired"] == 0
    assert stats["replaced"] == {"rotary_interleaved": 1}
    assert node.args[4] is False and node.args[2].meta["val"].shape[-1] == D
    assert count_ops(gm, aten.stack) == 1 and count_ops(gm, aten.neg) == 1  # the near miss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 7])
def test_pairwise_form_fused_with_half_width_tables(dtype, num_tokens):
    stats, gm, node, err = fuse(GLM(), num_tokens, dtype)
    assert err < tolerance(dtype)
    assert stats["matches"] == 1 and stats["details"]["unpaired"] == 0
    assert node.args[4] is False and node.args[2].meta["val"].shape[-1] == D // 2
    assert count_ops(gm, aten.stack) == 1 and count_ops(gm, aten.sub) == 1  # the near miss


def test_sign_flipped_pairwise_form_is_left_alone():
    class Flipped(Rope):
        def forward(self, x, positions):
            q, k, _ = self.qkv(x)
            cos, sin = self.tables(positions, x.dtype, "pairs")

            def rot(t):  # x1 * cos + x2 * sin: rotates the other way round
                t1, t2 = t[..., ::2], t[..., 1::2]
                return torch.stack((t1 * cos + t2 * sin, t2 * cos - t1 * sin), -1).flatten(-2)

            return rot(q), rot(k)

    ep = export(Flipped(), torch.randn(4, HIDDEN), torch.arange(4))
    [_, record], ctx, _ = run_passes(
        ep, ["cleanup", "fuse_rotary"], (torch.randn(3, HIDDEN), torch.arange(3))
    )
    assert record["stats"]["matches"] == 0 and record["stats"]["details"]["unpaired"] == 0
    assert count_ops(ctx.gm, aten.stack) == 2


def test_lone_rotation_is_counted_not_fused():
    class One(Rope):
        def forward(self, x, positions):
            q, _, _ = self.qkv(x)
            cos, sin = self.tables(positions, x.dtype, "rotate_half")
            return q * cos + rotate_half(q) * sin

    ep = export(One(), torch.randn(4, HIDDEN), torch.arange(4))
    [_, record], ctx, _ = run_passes(
        ep, ["cleanup", "fuse_rotary"], (torch.randn(3, HIDDEN), torch.arange(3))
    )
    assert record["stats"]["matches"] == 0 and record["stats"]["details"]["unpaired"] == 1
    assert count_ops(ctx.gm, aten.neg) == 1
