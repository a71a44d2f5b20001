"""fuse_silu_mul: the gated MLP activation -> xllm::silu_and_mul.

Before:  s = silu(gate); out = mul(s, up)        (either operand order)
After:   out = xllm.silu_and_mul(gate, up)

gate and up may be the two slices of a merged gate_up matmul (merge_gate_up runs first) or two
separate projections. Not matched: another activation (gelu), a silu read elsewhere too, or
operands of different shape or dtype (a broadcast is not the gated MLP).
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import (
    aten,
    call,
    erase_dead,
    insert_after_inputs,
    is_call,
    only_user,
    other_arg,
    val,
)


class FuseSiluMul(Pass):
    name = "fuse_silu_mul"
    VERSION = 1
    description = "silu(gate) * up -> xllm::silu_and_mul"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats, graph = PassStats(), gm.graph
        for silu in [n for n in graph.nodes if is_call(n, aten.silu.default)]:
            mul = only_user(silu)
            if not is_call(mul, aten.mul.Tensor):
                continue
            gate, up = silu.args[0], other_arg(mul, silu)
            g, u = val(gate), val(up)
            if u is None or g.dtype != u.dtype or str(g.shape) != str(u.shape):
                continue
            with graph.inserting_after(insert_after_inputs(graph, [gate, up])):
                fused = call(graph, torch.ops.xllm.silu_and_mul.default, (gate, up), like=mul)
            mul.replace_all_uses_with(fused)
            stats.matches += 1
            stats.count("silu_and_mul")
        erase_dead(graph)
        return stats
