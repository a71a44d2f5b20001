"""cleanup: bring the exported graph to one canonical form before the fusions match it.

    to.dtype(x, fp32) where x is fp32          ->  x        (no-op casts; export emits them)
    view/reshape(x, shape of x), alias(x)      ->  x        (no-op views)
    two identical pure calls on the same args  ->  the first (CSE)
    a pure call on parameters and literals     ->  a new parameter, computed now (folding)
    a pure call nobody uses                    ->  gone     (dead code)
    a parameter nobody reads                   ->  gone     (not saved in the artifact)

Side-effecting nodes (xllm::store_kv mutates the KV cache and returns nothing) are never
deleted, merged or moved, and no call reading a mutated value (the cache) is merged: two reads
of it on either side of a write differ.
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.graph_utils import is_side_effecting, mutated_inputs
from xllm_compile.passes.match import erase_dead, is_call, val

aten = torch.ops.aten
NOOP_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# Folding materializes a tensor in the artifact: only when it is no bigger than this many times
# the inputs it replaces (a cast or transpose is 1x; an outer product would not be).
FOLD_MAX_GROWTH = 1.0


class Cleanup(Pass):
    name = "cleanup"
    VERSION = 1
    description = "dead code, no-op casts/views, CSE, constant folding"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats = PassStats()
        graph = gm.graph
        stats.count("noop", _remove_noops(graph))
        stats.count("cse", _cse(graph))
        stats.count("folded", _fold_constants(graph, ctx))
        stats.count("dead", erase_dead(graph))
        unused = [n for n in graph.nodes if n.op == "placeholder" and not n.users]
        for node in [n for n in unused if ctx.param_name(n) is not None]:
            ctx.remove_param(node)  # nothing reads it: don't ship it
            stats.count("unused_params")
        stats.matches = sum(stats.replaced.values())
        return stats


def _remove_noops(graph: fx.Graph) -> int:
    removed = 0
    for node in list(graph.nodes):
        src = node.args[0] if node.args else None
        out, inp = val(node), val(src)
        if out is None or inp is None:
            continue
        if is_call(node, aten.to.dtype) and node.args[1] == inp.dtype and len(node.args) == 2:
            noop = not node.kwargs or node.kwargs == {"copy": False}
        elif is_call(node, *NOOP_VIEWS):
            noop = _same_shape(out, inp)
        else:
            noop = is_call(node, aten.alias.default)
        if noop and out.dtype == inp.dtype:
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            removed += 1
    return removed


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    # str(): symbolic sizes compare by expression without adding guards to the shape env.
    return a.dim() == b.dim() and all(
        str(x) == str(y) for x, y in zip(a.shape, b.shape, strict=True)
    )


def _cse(graph: fx.Graph) -> int:
    mutated = mutated_inputs(graph)
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or is_side_effecting(node):
            continue
        if any(a in mutated for a in node.all_input_nodes):
            continue  # reads the KV cache: its value depends on where it sits
        try:
            key = (node.target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _hashable(value):
    if isinstance(value, list | tuple):
        return (type(value).__name__, *(_hashable(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, torch.SymInt | torch.Tensor):
        raise TypeError("not a literal")
    return value


def _fold_constants(graph: fx.Graph, ctx: PassContext) -> int:
    consts = {n: ctx.weight(n) for n in graph.nodes if ctx.weight(n) is not None}
    folded = 0
    for node in list(graph.nodes):
        inputs = node.all_input_nodes
        if node.op != "call_function" or is_side_effecting(node) or not inputs:
            continue
        if not all(i in consts for i in inputs) or val(node) is None:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), consts.__getitem__)
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            continue
        if result.numel() > FOLD_MAX_GROWTH * sum(consts[i].numel() for i in inputs):
            continue
        name = f"_folded.{node.name}"
        new = ctx.add_param(name, result.contiguous())
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        consts[new] = result
        folded += 1
    return folded
