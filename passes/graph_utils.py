"""Graph analysis over torch.fx graphs, with networkx: the dependency graph, liveness intervals,
the critical path; plus the small facts every pass asks (side effects, op counts, meta["val"] of
a new node)."""

from __future__ import annotations

import operator
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


def has_collectives(graph: fx.Graph) -> bool:
    """True when the graph calls a functional collective (a tensor-parallel rank's program)."""
    return any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == "_c10d_functional"
        for n in graph.nodes
    )


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


def alias_sources(node: fx.Node) -> list[fx.Node]:
    """The inputs whose memory `node`'s output may share: the arguments an op's schema marks with
    the alias set of one of its returns (views, reshape, split; `Tensor(a!)` of in-place ops),
    the tuple a getitem reads from, and every tensor input of a call we cannot see into."""
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    schema = getattr(node.target, "_schema", None)
    if schema is None:  # a Python callable: assume the worst unless it returns no tensor
        val = node.meta.get("val")
        if val is not None and not any(isinstance(v, torch.Tensor) for v in _flat(val)):
            return []
        return list(node.all_input_nodes)
    sets = {s for r in schema.returns if r.alias_info for s in r.alias_info.before_set}
    if not sets:
        return []
    bound = _bind_args(schema, node)
    out = []
    for arg in schema.arguments:
        info = arg.alias_info
        if info is not None and set(info.before_set) & sets and arg.name in bound:
            out += [n for n in _flat(bound[arg.name]) if isinstance(n, fx.Node)]
    return out


def storage_groups(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Node -> the root of the memory it may share: the weakly connected components of the
    "may alias" graph (edges from `alias_sources`), each rooted at its first node in graph order.
    Conservative: two values in one component are treated as one buffer."""
    g = nx.Graph()
    order = {n: i for i, n in enumerate(graph.nodes)}
    g.add_nodes_from(order)
    g.add_edges_from((src, n) for n in graph.nodes for src in alias_sources(n))
    roots = {}
    for component in nx.connected_components(g):
        root = min(component, key=order.__getitem__)
        roots.update(dict.fromkeys(component, root))
    return roots


def buffer_liveness(graph: fx.Graph) -> dict[fx.Node, tuple[int, int]]:
    """Root -> (first index, last index) over every value that may share its memory: `liveness`
    with aliases (views, getitem, split outputs, in-place writes) folded into their root."""
    live = liveness(graph)
    out: dict[fx.Node, tuple[int, int]] = {}
    for node, root in storage_groups(graph).items():
        start, end = live[node]
        if root in out:
            start, end = min(start, out[root][0]), max(end, out[root][1])
        out[root] = (start, end)
    return out


def _bind_args(schema, node: fx.Node) -> dict:
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
    return bound


def _flat(value) -> list:
    if isinstance(value, list | tuple):
        return [v for item in value for v in _flat(item)]
    return [value]


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
