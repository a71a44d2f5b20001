"""merge_qkv and merge_gate_up: sibling linears merged into one matmul over weights concatenated
at compile time; the program's signature, state_dict and weights stay consistent (save/load
round trip); siblings that are not q/k/v or gate/up are left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import count_ops, export, run_passes
from test_fuse_silu_mul import TwoMLPs
from torch import nn
from torch.export import Dim

import xllm_compile.kernels  # noqa: F401
from xllm_compile.passes import run_graph
from xllm_compile.trace import strip_metadata_asserts

xllm, aten = torch.ops.xllm, torch.ops.aten
H, HKV, D, HIDDEN = 4, 2, 8, 32


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, H * D)  # biases, as Qwen2 has
        self.k_proj = nn.Linear(HIDDEN, HKV * D)
        self.v_proj = nn.Linear(HIDDEN, HKV * D)
        self.a, self.b = nn.Linear(HIDDEN, 8, bias=False), nn.Linear(HIDDEN, 8, bias=False)

    def forward(self, x, positions, token_slots, seq_slots, query_lens, seq_lens, kv_cache):
        t = x.shape[0]
        q = self.q_proj(x).view(t, H, D)
        k = self.k_proj(x).view(t, HKV, D)
        v = self.v_proj(x).view(t, HKV, D)
        torch.ops.xllm.store_kv(kv_cache, 0, k, v, token_slots, positions)
        o = torch.ops.xllm.attention(
            q, kv_cache, 0, positions, seq_slots, query_lens, seq_lens, D**-0.5, 0
        )
        return o.reshape(t, H * D), self.a(x) + self.b(x)  # a, b: siblings, not attention


def attn_inputs(num_tokens: int, num_seqs: int = 1):
    lens = torch.full((num_seqs,), num_tokens // num_seqs)
    lens[-1] += num_tokens - int(lens.sum())
    slots = torch.arange(num_seqs)
    positions = torch.cat([torch.arange(int(n)) for n in lens])
    cache = torch.zeros(1, 2, num_seqs, 16, HKV, D)
    token_slots = slots.repeat_interleave(lens)
    return (
        torch.randn(num_tokens, HIDDEN),
        positions,
        token_slots,
        slots,
        lens,
        lens.clone(),
        cache,
    )


def export_attn():
    t, b = Dim("num_tokens", min=1, max=64), Dim("num_seqs", min=1, max=8)
    shapes = ({0: t}, {0: t}, {0: t}, {0: b}, {0: b}, {0: b}, None)
    with torch.no_grad():
        ep = torch.export.export(Attn().eval(), attn_inputs(5, 2), dynamic_shapes=shapes)
    strip_metadata_asserts(ep)
    return ep


@pytest.mark.parametrize("num_tokens", [1, 5, 7])
def test_merge_qkv(num_tokens, tmp_path):
    torch.manual_seed(0)
    ep = export_attn()
    inputs = attn_inputs(num_tokens)
    [_, merge], ctx, err = run_passes(ep, ["cleanup", "merge_qkv"], inputs)
    assert err < 1e-5
    assert merge["stats"]["matches"] == 1
    assert count_ops(ctx.gm, aten.linear) == 3  # qkv + the untouched a, b
    names = ctx.param_order()
    assert "qkv_proj.weight" in names and "qkv_proj.bias" in names
    assert not any(n.startswith(("q_proj", "k_proj", "v_proj")) for n in names)
    assert set(ctx.ep.state_dict) == set(names) and set(ctx.weights) == set(names)
    assert ctx.weights["qkv_proj.weight"].shape == ((H + 2 * HKV) * D, HIDDEN)
    # the edited program saves, loads and runs with the weights in signature order
    torch.export.save(ctx.ep, tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2")
    ctx.ep = loaded
    assert ctx.param_order() == names
    [(_, out), *_] = run_graph(ctx)
    assert torch.equal(out, run_graph(ctx)[0][1])


@pytest.mark.parametrize("num_tokens", [1, 6])
def test_merge_gate_up_then_silu_and_mul(num_tokens):
    torch.manual_seed(0)
    ep = export(TwoMLPs(), torch.randn(4, 32))
    names = ["cleanup", "merge_gate_up", "fuse_silu_mul"]
    [_, merge, fuse], ctx, err = run_passes(ep, names, (torch.randn(num_tokens, 32),))
    assert err < 1e-5
    assert merge["stats"]["matches"] == 1 and fuse["stats"]["matches"] == 1
    assert count_ops(ctx.gm, aten.linear) == 3  # gate_up + the gelu MLP's two, unmerged
    assert "gate_up.weight" in ctx.param_order() and "g2.weight" in ctx.param_order()
    [silu_mul] = [n for n in ctx.gm.graph.nodes if n.target == xllm.silu_and_mul.default]
    assert all(a.target == aten.slice.Tensor for a in silu_mul.args)


def test_merged_name():
    from xllm_compile.passes.match import merged_name

    qkv = [f"m.layers.0.attn.{p}_proj.weight" for p in "qkv"]
    assert merged_name(qkv, {}) == "m.layers.0.attn.qkv_proj.weight"
    gate_up = ["mlp.gate_proj.bias", "mlp.up_proj.bias"]
    assert merged_name(gate_up, {}) == "mlp.gate_up_proj.bias"
    assert merged_name(gate_up, {"mlp.gate_up_proj.bias"}) == "mlp.gate_up_proj.bias_merged"


def test_gelu_siblings_not_merged():
    class Gelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g, self.u = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return F.gelu(self.g(x)) * self.u(x)

    ep = export(Gelu(), torch.randn(3, 8))
    [_, merge], ctx, _ = run_passes(ep, ["cleanup", "merge_gate_up"], (torch.randn(2, 8),))
    assert merge["stats"]["matches"] == 0 and count_ops(ctx.gm, aten.linear) == 2
