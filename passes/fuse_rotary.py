"""fuse_rotary: rotate-half rotary embedding of q and k -> one xllm::rotary_embedding.

Before, for x in (q, k), with cos/sin the tables gathered by position ([T, 1, D]):

    r = cat([neg(slice(x, -1, D/2, end)), slice(x, -1, 0, D/2)], -1)
    out = add(mul(x, cos), mul(r, sin))
After:
    f = xllm.rotary_embedding(q, k, cos, sin); q_out = f[0]; k_out = f[1]

q and k are paired when they share cos/sin and come from projections of the same input (the
merged qkv matmul, or q_proj/k_proj on one hidden state). A rotation with no partner is left as
it is and counted in stats.details["unpaired"]. Not matched: halves swapped without the neg, a
split other than D/2, or an interleaved (even/odd) rotation, which this model family never emits.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.graph_utils import ancestors_until
from xllm_compile.passes.match import (
    INT64_MAX,
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


@dataclass
class Rotation:
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    out: fx.Node
    nodes: set


def _is_half(node, x: fx.Node, start: int, end: int) -> bool:
    if not is_call(node, aten.slice.Tensor) or node.args[0] is not x:
        return False
    dim, lo = node.args[1], node.args[2]
    hi = node.args[3] if len(node.args) > 3 else INT64_MAX
    full = val(x).shape[-1]
    return is_last_dim(dim, val(x).dim()) and lo == start and hi in (end, full, INT64_MAX)


def match_rotation(cat: fx.Node) -> Rotation | None:
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if len(parts) != 2 or not is_call(parts[0], aten.neg.default):
        return None
    x = parts[0].args[0].args[0] if is_call(parts[0].args[0], aten.slice.Tensor) else None
    if x is None or val(x) is None or not is_last_dim(dim, val(x).dim()):
        return None
    d = val(x).shape[-1]
    if not isinstance(d, int) or d % 2:
        return None
    if not (_is_half(parts[0].args[0], x, d // 2, d) and _is_half(parts[1], x, 0, d // 2)):
        return None
    mul_sin = only_user(cat)
    add = only_user(mul_sin) if is_call(mul_sin, aten.mul.Tensor) else None
    if not is_call(add, aten.add.Tensor) or add.kwargs:
        return None
    mul_cos = other_arg(add, mul_sin)
    if not is_call(mul_cos, aten.mul.Tensor) or only_user(mul_cos) is not add:
        return None
    cos, sin = other_arg(mul_cos, x), other_arg(mul_sin, cat)
    if cos is None or val(cos) is None or val(add).shape != val(x).shape:
        return None
    if val(add).dtype != val(x).dtype:
        return None
    nodes = {parts[0].args[0], parts[0], parts[1], cat, mul_sin, mul_cos, add}
    return Rotation(x, cos, sin, add, nodes)


def _origin(x: fx.Node) -> fx.Node:
    """The input of the projection x comes from (walking up views, slices and norms), so q and
    k of one attention share it; x itself when there is none."""
    linear = ancestors_until(x, lambda n: is_call(n, aten.linear.default))
    return linear.args[0] if linear is not None else x


class FuseRotary(Pass):
    name = "fuse_rotary"
    VERSION = 1
    description = "rotate-half rotary on q and k -> xllm::rotary_embedding"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats, graph = PassStats(), gm.graph
        groups: dict[tuple, list[Rotation]] = defaultdict(list)
        for cat in [n for n in graph.nodes if is_call(n, aten.cat.default)]:
            rot = match_rotation(cat)
            if rot is not None:
                groups[(_origin(rot.x), rot.cos, rot.sin)].append(rot)
        unpaired = 0
        for rots in groups.values():
            for q, k in zip(rots[0::2], rots[1::2], strict=False):
                if self._fuse(graph, q, k):
                    stats.matches += 1
                    stats.count("rotary_embedding")
                else:
                    unpaired += 2
            unpaired += len(rots) % 2
        stats.details["unpaired"] = unpaired
        erase_dead(graph)
        return stats

    def _fuse(self, graph: fx.Graph, q: Rotation, k: Rotation) -> bool:
        anchor = insert_after_inputs(graph, [q.x, k.x, q.cos, q.sin])
        if not precedes_uses(anchor, [q.out, k.out], q.nodes | k.nodes):
            return False
        op = torch.ops.xllm.rotary_embedding.default
        with graph.inserting_after(anchor):
            fused = call(graph, op, (q.x, k.x, q.cos, q.sin), like=q.out)
        with graph.inserting_after(fused):
            q_out = getitem(graph, fused, 0)
        with graph.inserting_after(q_out):
            k_out = getitem(graph, fused, 1)
        q.out.replace_all_uses_with(q_out)
        k.out.replace_all_uses_with(k_out)
        return True
