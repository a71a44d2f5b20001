"""fuse_rotary: rotary embedding of q and k -> one xllm::rotary_embedding.

Before, for x in (q, k), with cos/sin the tables gathered by position ([T, 1, D]), one of:

    rotate-half (Llama, Qwen):   r = cat([neg(slice(x, -1, D/2, D)), slice(x, -1, 0, D/2)], -1)
    interleaved (GPT-J, Cohere): r = flatten(stack([neg(slice(x, -1, 1, D, 2)),
                                                    slice(x, -1, 0, D, 2)], -1), -2)
                                 out = add(mul(x, cos), mul(r, sin))
    interleaved on the pairs, x1 = slice(x, -1, 0, D, 2), x2 = slice(x, -1, 1, D, 2), [T, 1, D/2]
    tables (GLM):                out = flatten(stack([sub(mul(x1, cos), mul(x2, sin)),
                                                      add(mul(x2, cos), mul(x1, sin))], -1), -2)
After:
    f = xllm.rotary_embedding(q, k, cos, sin[, is_neox=False]); q_out = f[0]; k_out = f[1]

q and k are paired when they share cos/sin and pairing and come from projections of the same
input (the merged qkv matmul, or q_proj/k_proj on one hidden state). A rotation with no partner
is left as it is and counted in stats.details["unpaired"]. Not matched: halves swapped without
the neg or with the sign on the other half, a split other than D/2 or a stride other than 2, a
partial rotation (slices of x, not x), or output that changes shape or dtype.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.graph_utils import ancestors_until
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


@dataclass
class Rotation:
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    out: fx.Node
    nodes: set
    is_neox: bool


def _slice(node) -> tuple | None:
    """(x, start, end, step) of a slice of x's last dim (an end past D reads as D), else None."""
    if not is_call(node, aten.slice.Tensor) or val(node.args[0]) is None:
        return None
    x, dim, start, end, step = (*node.args, None, None, None, None)[:5]
    shape = val(x).shape
    if not is_last_dim(0 if dim is None else dim, len(shape)):
        return None
    d = shape[-1]
    end = d if end is None or (isinstance(end, int) and isinstance(d, int) and end >= d) else end
    return x, start or 0, end, 1 if step is None else step


def _head_dim(x: fx.Node) -> int | None:
    d = val(x).shape[-1]
    return d if isinstance(d, int) and d % 2 == 0 else None


def _rotated(r: fx.Node, x: fx.Node, nodes: set, is_neox: bool) -> Rotation | None:
    """out = add(mul(x, cos), mul(r, sin)) with r = rotate(x): the rotation, or None."""
    mul_sin = only_user(r)
    add = only_user(mul_sin) if is_call(mul_sin, aten.mul.Tensor) else None
    if not is_call(add, aten.add.Tensor) or add.kwargs:
        return None
    mul_cos = other_arg(add, mul_sin)
    if not is_call(mul_cos, aten.mul.Tensor) or only_user(mul_cos) is not add:
        return None
    cos, sin = other_arg(mul_cos, x), other_arg(mul_sin, r)
    if cos is None or val(cos) is None or val(sin) is None:
        return None
    return Rotation(x, cos, sin, add, nodes | {mul_sin, mul_cos, add}, is_neox)


def _rotate_half(cat: fx.Node) -> Rotation | None:
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if len(parts) != 2 or not is_call(parts[0], aten.neg.default):
        return None
    hi, lo = _slice(parts[0].args[0]), _slice(parts[1])
    x = lo[0] if lo is not None else None
    d = _head_dim(x) if x is not None else None
    if d is None or not is_last_dim(dim, val(x).dim()):
        return None
    if hi != (x, d // 2, d, 1) or lo != (x, 0, d // 2, 1):
        return None
    return _rotated(cat, x, {parts[0].args[0], *parts, cat}, is_neox=True)


def _interleaved(flatten: fx.Node) -> Rotation | None:
    """flatten(stack([a, b], -1), -2): the (even, odd) pairs written back in place."""
    stack = flatten.args[0]
    if not is_call(stack, aten.stack.default) or val(stack) is None:
        return None
    ndim, args = val(stack).dim(), flatten.args
    start, end = args[1] if len(args) > 1 else 0, args[2] if len(args) > 2 else -1
    dim = stack.args[1] if len(stack.args) > 1 else 0
    if start not in (-2, ndim - 2) or end not in (-1, ndim - 1) or dim not in (-1, ndim - 1):
        return None
    if len(stack.args[0]) != 2:
        return None
    a, b = stack.args[0]
    if not is_call(a, aten.neg.default):
        return _pairwise(flatten, stack, a, b)
    odd, even = _slice(a.args[0]), _slice(b)  # r = stack(-x[..., 1::2], x[..., ::2])
    x = even[0] if even is not None else None
    d = _head_dim(x) if x is not None else None
    if d is None or odd != (x, 1, d, 2) or even != (x, 0, d, 2):
        return None
    return _rotated(flatten, x, {a.args[0], a, b, stack, flatten}, is_neox=False)


def _scaled(mul, start: int) -> tuple | None:
    """mul(x[..., start::2], table) in either order -> (x, table)."""
    if not is_call(mul, aten.mul.Tensor):
        return None
    for half, table in (mul.args[:2], mul.args[1::-1]):
        s = _slice(half)
        if s is not None and _head_dim(s[0]) is not None and s[1:] == (start, _head_dim(s[0]), 2):
            return s[0], table
    return None


def _pairwise(flatten: fx.Node, stack: fx.Node, sub, add) -> Rotation | None:
    if not (is_call(sub, aten.sub.Tensor) and is_call(add, aten.add.Tensor)):
        return None
    if sub.kwargs or add.kwargs:  # alpha
        return None
    x1c, x2s = _scaled(sub.args[0], 0), _scaled(sub.args[1], 1)  # x1 * cos - x2 * sin
    x2c, x1s = _scaled(add.args[0], 1), _scaled(add.args[1], 0)  # x2 * cos + x1 * sin
    if x2c is None:
        x2c, x1s = _scaled(add.args[1], 1), _scaled(add.args[0], 0)
    if None in (x1c, x2s, x2c, x1s) or len({x1c[0], x2s[0], x2c[0], x1s[0]}) != 1:
        return None
    (x, cos), sin = x1c, x2s[1]
    if x2c[1] is not cos or x1s[1] is not sin or val(cos) is None or val(sin) is None:
        return None
    muls = {*sub.args[:2], *add.args[:2]}
    halves = {a for m in muls for a in m.args[:2] if (_slice(a) or (None,))[0] is x}
    return Rotation(x, cos, sin, flatten, muls | halves | {sub, add, stack, flatten}, False)


def match_rotation(node: fx.Node) -> Rotation | None:
    if is_call(node, aten.cat.default):
        rot = _rotate_half(node)
    elif is_call(node, aten.flatten.using_ints):
        rot = _interleaved(node)
    else:
        return None
    if rot is None or val(rot.out) is None:
        return None
    same = val(rot.out).shape == val(rot.x).shape and val(rot.out).dtype == val(rot.x).dtype
    return rot if same else None


def _origin(x: fx.Node) -> fx.Node:
    """The input of the projection x comes from (walking up views, slices and norms), so q and
    k of one attention share it; x itself when there is none."""
    linear = ancestors_until(x, lambda n: is_call(n, aten.linear.default))
    return linear.args[0] if linear is not None else x


class FuseRotary(Pass):
    name = "fuse_rotary"
    VERSION = 2  # 2: interleaved (GPT-J) rotations too
    description = "rotary on q and k (rotate-half or interleaved) -> xllm::rotary_embedding"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats, graph = PassStats(), gm.graph
        groups: dict[tuple, list[Rotation]] = defaultdict(list)
        for node in list(graph.nodes):
            rot = match_rotation(node)
            if rot is not None:
                groups[(_origin(rot.x), rot.cos, rot.sin, rot.is_neox)].append(rot)
        unpaired = 0
        for rots in groups.values():
            for q, k in zip(rots[0::2], rots[1::2], strict=False):
                if self._fuse(graph, q, k):
                    stats.matches += 1
                    stats.count("rotary_embedding" if q.is_neox else "rotary_interleaved")
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
        args = (q.x, k.x, q.cos, q.sin) + (() if q.is_neox else (False,))
        with graph.inserting_after(anchor):
            fused = call(graph, torch.ops.xllm.rotary_embedding.default, args, like=q.out)
        with graph.inserting_after(fused):
            q_out = getitem(graph, fused, 0)
        with graph.inserting_after(q_out):
            k_out = getitem(graph, fused, 1)
        q.out.replace_all_uses_with(q_out)
        k.out.replace_all_uses_with(k_out)
        return True
