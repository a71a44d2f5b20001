"""merge_gate_up: the gate and up projections of a gated MLP -> one matmul over concatenated
weights (built now, saved that way in the artifact) whose two halves feed the activation.

Before:  g = linear(x, Wg); u = linear(x, Wu); h = mul(silu(g), u)   (or silu_and_mul(g, u))
After:   gu = linear(x, W_gate_up); h = mul(silu(gu[..., :I]), gu[..., I:])

Runs before fuse_silu_mul, which then turns the two halves into xllm.silu_and_mul(gate, up).
Not merged: siblings that do not meet in silu(a) * b (e.g. a gelu MLP's projections).
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import (
    aten,
    blocks_agree,
    is_call,
    merge_linears,
    only_user,
    sibling_linears,
)


def up_of(gate: fx.Node) -> fx.Node | None:
    """The node multiplied with silu(gate) (or passed to silu_and_mul with gate), if any."""
    user = only_user(gate)
    if is_call(user, torch.ops.xllm.silu_and_mul.default) and user.args[0] is gate:
        return user.args[1]
    if is_call(user, aten.silu.default):
        mul = only_user(user)
        if is_call(mul, aten.mul.Tensor):
            return mul.args[1] if mul.args[0] is user else mul.args[0]
    return None


class MergeGateUp(Pass):
    name = "merge_gate_up"
    VERSION = 1
    description = "gate/up projections -> one matmul on concatenated weights + two halves"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats = PassStats()
        for group in sibling_linears(gm.graph, ctx):
            pairs = [(g, up_of(g)) for g in group if up_of(g) in group]
            for gate, up in pairs:
                if not blocks_agree(ctx, [gate, up]):
                    continue
                merge_linears(gm.graph, ctx, [gate, up])
                stats.matches += 1
                stats.count("gate_up")
        return stats
