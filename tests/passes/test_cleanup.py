"""cleanup: no-op casts/views, CSE, constant folding, dead code; never a side-effecting node,
and never a merge of two reads of the KV cache around a write."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import count_ops, export, run_passes
from test_merge_linears import HKV, D, attn_inputs, export_attn
from torch import nn

xllm, aten = torch.ops.xllm, torch.ops.aten


class Messy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        x = x.to(torch.float32)  # fp32 -> fp32: export keeps an aten.to.dtype
        y = x.view(x.shape[0], 8)  # a view to the same shape
        a, b = y.sin(), y.sin()  # common subexpression
        return (a + b) @ (self.w * 2)  # w * 2: only parameters -> folded at compile time


@pytest.mark.parametrize("num_tokens", [1, 3, 6])
def test_cleanup_canonicalizes(num_tokens):
    ep = export(Messy(), torch.randn(4, 8))
    [clean], ctx, err = run_passes(ep, ["cleanup"], (torch.randn(num_tokens, 8),))
    assert err < 1e-6
    replaced = clean["stats"]["replaced"]
    assert replaced["noop"] == 2 and replaced["cse"] == 1 and replaced["folded"] == 1
    assert replaced["unused_params"] == 1  # w itself: only the folded w * 2 is read now
    gm = ctx.gm
    assert count_ops(gm, aten.sin) == 1 and count_ops(gm, aten.to) == 0
    assert count_ops(gm, aten.mul) == 0 and ctx.param_order() == ["_folded.mul"]


def test_dead_code_goes_side_effects_stay():
    ep = export_attn()
    graph = ep.graph_module.graph
    x = next(n for n in graph.nodes if n.name == "x")
    with graph.inserting_after(x):
        graph.call_function(aten.cos.default, (x,)).meta["val"] = x.meta["val"]  # unused
    [clean], ctx, _ = run_passes(ep, ["cleanup"], attn_inputs(3))
    assert clean["stats"]["replaced"]["dead"] == 1
    assert count_ops(ctx.gm, xllm.store_kv) == 1  # returns nothing, never "dead"


class TwoReads(nn.Module):
    """attention reads the cache before and after a store_kv with identical arguments."""

    def forward(self, q, k, positions, token_slots, seq_slots, query_lens, seq_lens, cache):
        args = (positions, seq_slots, query_lens, seq_lens, 1.0, 0)
        before = torch.ops.xllm.attention(q, cache, 0, *args)
        torch.ops.xllm.store_kv(cache, 0, k, k, token_slots, positions)
        after = torch.ops.xllm.attention(q, cache, 0, *args)
        return before, after


def test_cse_keeps_reads_around_a_kv_write():
    """Regression: CSE on (target, args) alone would merge the two attention calls, and the
    second would miss the keys store_kv just wrote."""
    x, positions, token_slots, seq_slots, lens, seq_lens, cache = attn_inputs(3)
    q, k = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    inputs = (q, k, positions, token_slots, seq_slots, lens, seq_lens, cache)
    ep = export(TwoReads(), *inputs, token_inputs=0)
    [clean], ctx, _ = run_passes(ep, ["cleanup"], inputs)
    assert count_ops(ctx.gm, xllm.attention) == 2
    assert "cse" not in clean["stats"]["replaced"]
