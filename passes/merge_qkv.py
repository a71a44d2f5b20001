"""merge_qkv: the q, k and v projections of one attention -> one matmul over concatenated
weights (built now, saved that way in the artifact) and a slice per projection.

Before:  q = linear(x, Wq[, bq]); k = linear(x, Wk[, bk]); v = linear(x, Wv[, bv])
After:   qkv = linear(x, W_qkv[, b_qkv]); q = qkv[..., :Nq]; k = qkv[..., Nq:Nq+Nk]; v = ...

The merged linears are those of a sibling group (same input) that feed xllm::attention or
xllm::store_kv within a few ops, not through another matmul; other siblings stay as they are.
One matmul streams the same weight bytes but makes one call instead of three.
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import aten, blocks_agree, is_call, merge_linears, sibling_linears

ATTENTION_OPS = (torch.ops.xllm.attention.default, torch.ops.xllm.store_kv.default)
MATMULS = (aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default)
MAX_HOPS = 12  # linear -> view -> (norm) -> rotary -> getitem -> attention is ~6


def reaches(node: fx.Node, targets, max_hops: int = MAX_HOPS) -> bool:
    """True when a call of one of `targets` consumes `node` within `max_hops` steps, without
    going through another matmul (an MLP's output reaches the next layer's attention too)."""
    frontier, seen = [node], {node}
    for _ in range(max_hops):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        if any(u.op == "call_function" and u.target in targets for u in frontier):
            return True
        seen.update(frontier)
        frontier = [u for u in frontier if not is_call(u, *MATMULS)]
    return False


class MergeQKV(Pass):
    name = "merge_qkv"
    VERSION = 1
    description = "q/k/v projections -> one matmul on concatenated weights + slices"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats = PassStats()
        for group in sibling_linears(gm.graph, ctx):
            members = [lin for lin in group if reaches(lin, ATTENTION_OPS)]
            if len(members) >= 2 and blocks_agree(ctx, members):
                merge_linears(gm.graph, ctx, members)
                stats.matches += 1
                stats.count(f"linear x{len(members)}")
        return stats
