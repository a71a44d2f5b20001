"""fuse_rms_norm: RMSNorm -> xllm::rms_norm, and residual add + RMSNorm -> xllm::fused_add_rms_norm.

Before (after cleanup; the two casts exist only below fp32):

    x32 = to(x, fp32); v = mean(pow(x32, 2), [-1], keepdim); r = rsqrt(add(v, eps))
    out = mul(w, to(mul(x32, r), x.dtype))
After:
    out = xllm.rms_norm(x, w, eps)
and when x = add(h, residual) (same shape and dtype):
    f = xllm.fused_add_rms_norm(h, residual, w, eps); out = f[0]; x's other users read f[1]

Not matched: a norm without eps (`rsqrt(mean)`), a reduction over another dim, a weight that is
not [D], a result dtype other than x's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import (
    aten,
    call,
    erase_dead,
    getitem,
    insert_after_inputs,
    is_call,
    is_last_dim,
    only_user,
    other_arg,
    precedes_uses,
    val,
)

xllm = torch.ops.xllm


@dataclass
class RMSNormMatch:
    x: fx.Node  # the input, in its own dtype (before the fp32 upcast)
    weight: fx.Node
    eps: float
    out: fx.Node  # the weight multiply: what the fused op replaces
    nodes: set  # every matched node (erased once unused)


def match_rms_norm(rsqrt: fx.Node) -> RMSNormMatch | None:
    # The statistics (pow, mean, add) may be shared with other readers (CSE merges equal ones);
    # they then stay for those readers, and the fused op recomputes its own.
    add = rsqrt.args[0]
    if not is_call(add, aten.add.Tensor) or not isinstance(add.args[1], float | int):
        return None  # no eps: a near miss, not an RMSNorm we know the numerics of
    mean = add.args[0]
    if not is_call(mean, aten.mean.dim):
        return None
    dims, keepdim = mean.args[1], (mean.args[2] if len(mean.args) > 2 else False)
    sq = mean.args[0]
    if not (is_call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2):
        return None
    x32 = sq.args[0]
    if val(x32) is None or val(x32).dtype != torch.float32:
        return None
    if not keepdim or len(dims) != 1 or not is_last_dim(dims[0], val(x32).dim()):
        return None
    scaled = only_user(rsqrt)
    if not is_call(scaled, aten.mul.Tensor) or other_arg(scaled, rsqrt) is not x32:
        return None
    nodes = {add, mean, sq, rsqrt, scaled}
    x = x32.args[0] if is_call(x32, aten.to.dtype) else x32
    if x is not x32:
        nodes.add(x32)
    cur = only_user(scaled)
    if is_call(cur, aten.to.dtype):  # the downcast back to x's dtype
        nodes.add(cur)
        cur, prev = only_user(cur), cur
    else:
        prev = scaled
    if not is_call(cur, aten.mul.Tensor):
        return None
    weight = other_arg(cur, prev)
    w, xv, out = val(weight), val(x), val(cur)
    if w is None or w.dim() != 1 or str(w.shape[0]) != str(xv.shape[-1]):
        return None
    if out.dtype != xv.dtype or str(out.shape) != str(xv.shape):
        return None
    return RMSNormMatch(x, weight, float(add.args[1]), cur, nodes | {cur})


def residual_add(x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(h, residual) when x = h + residual of one shape and dtype (no broadcast, no alpha)."""
    if not is_call(x, aten.add.Tensor) or x.kwargs or len(x.args) != 2:
        return None
    a, b = (val(arg) for arg in x.args)
    if a is None or b is None or a.dtype != b.dtype or str(a.shape) != str(b.shape):
        return None
    return x.args[0], x.args[1]


class FuseRMSNorm(Pass):
    name = "fuse_rms_norm"
    VERSION = 1
    description = "RMSNorm -> xllm::rms_norm; residual add + RMSNorm -> xllm::fused_add_rms_norm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats, graph = PassStats(), gm.graph
        for rsqrt in [n for n in graph.nodes if is_call(n, aten.rsqrt.default)]:
            m = match_rms_norm(rsqrt)
            if m is None:
                continue
            pair = residual_add(m.x)
            if pair is not None and self._fuse_add(graph, m, pair):
                stats.count("fused_add_rms_norm")
            else:
                self._fuse(graph, m)
                stats.count("rms_norm")
            stats.matches += 1
        erase_dead(graph)
        return stats

    def _fuse(self, graph: fx.Graph, m: RMSNormMatch) -> None:
        with graph.inserting_after(insert_after_inputs(graph, [m.x, m.weight])):
            fused = call(graph, xllm.rms_norm.default, (m.x, m.weight, m.eps), like=m.out)
        m.out.replace_all_uses_with(fused)

    def _fuse_add(self, graph: fx.Graph, m: RMSNormMatch, pair) -> bool:
        anchor = insert_after_inputs(graph, [*pair, m.weight])
        if not precedes_uses(anchor, [m.x], m.nodes):
            return False
        with graph.inserting_after(anchor):
            fused = call(graph, xllm.fused_add_rms_norm.default, (*pair, m.weight, m.eps), m.out)
        with graph.inserting_after(fused):
            normed = getitem(graph, fused, 0)
        with graph.inserting_after(normed):
            residual = getitem(graph, fused, 1)
        m.out.replace_all_uses_with(normed)
        m.x.replace_all_uses_with(residual)
        return True
