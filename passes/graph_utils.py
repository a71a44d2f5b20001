"""Graph analysis over torch.fx graphs, with networkx: the dependency graph, liveness intervals,
the critical path; plus the small facts every pass asks (side effects, op counts, meta["val"] of
a new node)."""

from __future__ import annotations

from collections import Counter

import networkx as nx
import torch
from torch import fx
from torch._guards import detect_fake_mode


def is_side_effecting(node: fx.Node) -> bool:
    """True for nodes that must never be deleted, merged or moved across: placeholders, output,
    and ops that mutate an input (xllm::store_kv writes the KV cache and returns nothing)."""
    if node.op in ("placeholder", "output"):
        return True
    schema = getattr(node.target, "_schema", None)
    return (schema is not None and schema.is_mutable) or node.is_impure()


def mutated_inputs(graph: fx.Graph) -> set[fx.Node]:
    """Nodes passed to a mutating argument of some op (the KV cache): values that change while
    the graph runs, so two reads of them are not interchangeable."""
    out = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for arg, value in zip(schema.arguments, node.args, strict=False):
            if arg.alias_info is not None and arg.alias_info.is_write:
                out.update(a for a in fx.node.map_arg(value, lambda n: [n]) or [])
    return out


def count_ops(gm: fx.GraphModule | fx.Graph, target=None) -> int | Counter:
    """Calls of `target` (an OpOverload or OpOverloadPacket), or a Counter over all targets."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    calls = [n.target for n in graph.nodes if n.op == "call_function"]
    if target is None:
        return Counter(str(t) for t in calls)
    return sum(1 for t in calls if t == target or getattr(t, "overloadpacket", None) == target)


def set_meta_val(node: fx.Node) -> None:
    """Fill `node.meta["val"]` by running its target on its inputs' fake values (the program's
    fake mode, so symbolic sizes stay symbolic)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    mode = detect_fake_mode([v for v in fx.node.map_aggregate(args, lambda a: a)])
    if mode is None:
        flat = [n.meta.get("val") for n in node.graph.nodes if n.op == "placeholder"]
        mode = detect_fake_mode(flat)
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def dependency_graph(graph: fx.Graph) -> nx.DiGraph:
    """Edges producer -> consumer, plus an ordering edge from every side-effecting node to the
    later ones that read what it mutated (attention reads the cache store_kv wrote)."""
    g = nx.DiGraph()
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        g.add_node(node, order=order[node])
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    mutated = mutated_inputs(graph)
    writers = [n for n in graph.nodes if n.op == "call_function" and is_side_effecting(n)]
    for w in writers:
        written = set(w.all_input_nodes) & mutated
        for reader in (u for m in written for u in m.users):
            if order[reader] > order[w]:
                g.add_edge(w, reader)
    return g


def liveness(graph: fx.Graph) -> dict[fx.Node, tuple[int, int]]:
    """Node -> (index where its value is produced, index of its last use): the interval in which
    its buffer must stay allocated. Outputs stay live to the end."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    end = len(order)
    out = {}
    for node, i in order.items():
        last = max((order[u] for u in node.users), default=i)
        out[node] = (i, end if any(u.op == "output" for u in node.users) else last)
    return out


def critical_path(graph: fx.Graph, cost=None) -> tuple[list[fx.Node], float]:
    """Longest path through the dependency graph by `cost(node)` (default 1 per call)."""
    g = dependency_graph(graph)
    cost = cost or (lambda n: 1.0 if n.op == "call_function" else 0.0)
    for u, v in g.edges:
        g.edges[u, v]["w"] = cost(v)
    path = nx.dag_longest_path(g, weight="w", topo_order=list(graph.nodes))
    return path, sum(cost(n) for n in path)


def ancestors_until(node: fx.Node, stop, limit: int = 16) -> fx.Node | None:
    """Walk up first arguments from `node` until `stop(n)` holds; None after `limit` steps."""
    cur = node
    for _ in range(limit):
        if stop(cur):
            return cur
        inputs = cur.all_input_nodes
        if not inputs:
            return None
        cur = inputs[0]
    return None


def torch_dtype_of(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return getattr(val, "dtype", None)
