"""Small pattern-matching and rewriting helpers shared by the fusion passes: op tests, single
users, where a replacement may be inserted, and the horizontal merge of sibling linears."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence

import torch
from torch import fx

import xllm_compile.kernels  # noqa: F401  (registers torch.ops.xllm.*)
from xllm_compile.passes.base import PassContext
from xllm_compile.passes.graph_utils import is_side_effecting, set_meta_val

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


def is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def other_arg(node: fx.Node, known: fx.Node):
    """The operand of a binary op that is not `known` (None if `known` is not an operand)."""
    a, b = node.args[:2]
    return b if a is known else a if b is known else None


def val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def is_last_dim(dim, ndim: int) -> bool:
    return dim in (-1, ndim - 1)


def call(graph: fx.Graph, target, args: tuple, like: fx.Node | None = None) -> fx.Node:
    """A new call node with meta["val"] computed, carrying `like`'s stack trace for debugging."""
    node = graph.call_function(target, args)
    set_meta_val(node)
    if like is not None and "stack_trace" in like.meta:
        node.meta["stack_trace"] = like.meta["stack_trace"]
    return node


def insert_after_inputs(graph: fx.Graph, inputs: Iterable) -> fx.Node:
    """The node after which a replacement reading `inputs` may go: the latest input, or the last
    placeholder when every input is a placeholder (placeholders stay first)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = [n for n in inputs if isinstance(n, fx.Node)]
    last = max(nodes, key=order.__getitem__)
    if last.op == "placeholder":
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    return last


def precedes_uses(anchor: fx.Node, outputs: Sequence[fx.Node], inside: set) -> bool:
    """True when every use of `outputs` outside the matched nodes comes after `anchor`."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    users = [u for o in outputs for u in o.users if u not in inside]
    return all(order[u] > order[anchor] for u in users)


def erase_dead(graph: fx.Graph) -> int:
    """Erase pure call nodes without users, last first; never a side-effecting one."""
    erased = 0
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and not is_side_effecting(node):
            graph.erase_node(node)
            erased += 1
    return erased


def sibling_linears(graph: fx.Graph, ctx: PassContext) -> list[list[fx.Node]]:
    """Groups (>= 2) of `aten.linear` calls on the same input whose weights (and biases, all or
    none) are parameters of one dtype and in_features: candidates for a horizontal merge."""
    groups = []
    for node in graph.nodes:
        by_kind: dict[tuple, list[fx.Node]] = {}
        for u in node.users:
            if is_call(u, aten.linear.default) and u.args[0] is node and _mergeable(u, ctx):
                w = ctx.weight(u.args[1])
                has_bias = len(u.args) > 2 and u.args[2] is not None
                by_kind.setdefault((w.dtype, w.shape[1], has_bias), []).append(u)
        groups += [g for g in by_kind.values() if len(g) >= 2]
    return groups


def _mergeable(linear: fx.Node, ctx: PassContext) -> bool:
    w = ctx.weight(linear.args[1])
    bias = linear.args[2] if len(linear.args) > 2 else None
    return w is not None and w.dim() == 2 and (bias is None or ctx.weight(bias) is not None)


def blocks_agree(ctx: PassContext, linears: list[fx.Node]) -> bool:
    """Whether the linears' weights may be merged as far as `--quant keep` goes: none has
    quantized blocks, or all have blocks of one format (then merged as blocks too)."""
    kinds = {ctx.blocks[n][0] if n in ctx.blocks else None for n in _weight_names(ctx, linears)}
    return len(kinds) == 1


def _weight_names(ctx: PassContext, linears: list[fx.Node]) -> list[str]:
    return [ctx.param_name(lin.args[1]) for lin in linears]


def merge_linears(graph: fx.Graph, ctx: PassContext, linears: list[fx.Node]) -> fx.Node:
    """Replace sibling linears by one linear over their concatenated weights (made now, at
    compile time, and saved that way) and a slice of its output per original. Removes the old
    parameters. Returns the merged linear. Callers check `blocks_agree` first."""
    x = linears[0].args[0]
    weight_nodes = [lin.args[1] for lin in linears]
    bias_nodes = [lin.args[2] if len(lin.args) > 2 else None for lin in linears]
    names = _weight_names(ctx, linears)
    w_name = merged_name(names, ctx.weights)
    if names[0] in ctx.blocks:  # --quant keep: the blocks, row after row, as the floats
        ctx.blocks[w_name] = (
            ctx.blocks[names[0]][0],
            torch.cat([ctx.blocks.pop(n)[1] for n in names], 0),
        )
    w = ctx.add_param(w_name, torch.cat([ctx.weight(n) for n in weight_nodes], 0))
    args = (x, w)
    if bias_nodes[0] is not None:
        b_name = merged_name([ctx.param_name(n) for n in bias_nodes], ctx.weights)
        args += (ctx.add_param(b_name, torch.cat([ctx.weight(n) for n in bias_nodes], 0)),)
    with graph.inserting_after(insert_after_inputs(graph, [x, *args[1:]])):
        merged = call(graph, aten.linear.default, args, like=linears[0])
    start, anchor = 0, merged
    for lin in linears:
        size = ctx.weight(lin.args[1]).shape[0]
        with graph.inserting_after(anchor):
            part = call(graph, aten.slice.Tensor, (merged, -1, start, start + size), like=lin)
        lin.replace_all_uses_with(part)
        graph.erase_node(lin)
        start, anchor = start + size, part
    for node in {n for n in weight_nodes + bias_nodes if n is not None and not n.users}:
        ctx.remove_param(node)
    return merged


def merged_name(names: list[str], taken) -> str:
    """'a.q_proj.weight', 'a.k_proj.weight', 'a.v_proj.weight' -> 'a.qkv_proj.weight';
    'm.gate_proj.weight', 'm.up_proj.weight' -> 'm.gate_up_proj.weight'."""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    rest = [n[len(prefix) :] for n in names]
    suffix = os.path.commonprefix([r[::-1] for r in rest])[::-1]
    mids = [r[: len(r) - len(suffix)] for r in rest]
    joined = "".join(mids) if all(len(m) == 1 for m in mids) else "_".join(mids)
    name = prefix + joined + suffix
    while name in taken:
        name += "_merged"
    return name


def getitem(graph: fx.Graph, node: fx.Node, index: int) -> fx.Node:
    return call(graph, operator.getitem, (node, index))
