"""schedule_collectives: issue every collective as soon as its input exists and wait for it as
late as its first consumer allows, moving independent compute in between: a list schedule over
the dependency graph (networkx), deterministic, with collectives first and waits last among
the nodes ready at each point.

Before:  y0 = linear(x0); r0 = all_reduce(y0); w0 = wait(r0); y1 = linear(x1); r1 = all_reduce(y1)
After:   y0 = linear(x0); r0 = all_reduce(y0); y1 = linear(x1); r1 = all_reduce(y1); w0 = wait(r0)

In a plain tensor-parallel decoder every op after an all-reduce needs its result, so little
moves; after chunk_allreduce (or micro-batches) the chunks are independent and overlap. Nodes
that write or read a mutated value (store_kv, attention on the KV cache) keep their order.
Stats: waits moved, and the compute nodes now between an issue and its wait (overlapped).
"""

from __future__ import annotations

import heapq

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.graph_utils import (
    dependency_graph,
    has_collectives,
    is_side_effecting,
    mutated_inputs,
)

c10d = torch.ops._c10d_functional
ISSUES = frozenset(
    {c10d.all_reduce.default, c10d.all_gather_into_tensor.default}
    | {c10d.reduce_scatter_tensor.default}
)
WAIT = c10d.wait_tensor.default


def overlap(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """wait node -> compute nodes scheduled between its collective's issue and it."""
    at = {n: i for i, n in enumerate(nodes)}
    out = {}
    for n in nodes:
        if n.target == WAIT and n.args[0] in at:
            between = nodes[at[n.args[0]] + 1 : at[n]]
            out[n] = sum(1 for m in between if m.op == "call_function" and m.target != WAIT)
    return out


class ScheduleCollectives(Pass):
    name = "schedule_collectives"
    VERSION = 1
    description = "collectives issued as early and waited as late as dependencies allow"

    def applies(self, ctx: PassContext) -> str | None:
        if not has_collectives(ctx.gm.graph):
            return "no collectives (not a tensor-parallel program)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        graph = gm.graph
        before = overlap(list(graph.nodes))
        order = self.schedule(graph)
        out = next(n for n in graph.nodes if n.op == "output")
        for node in order:
            if node.op not in ("placeholder", "output"):
                out.prepend(node)  # moves it: the nodes end up in `order`
        after = overlap(list(graph.nodes))
        moved = sum(1 for w, n in after.items() if n > before.get(w, 0))
        stats = PassStats(matches=moved)
        stats.details = {"waits_moved": moved, "nodes_overlapped": sum(after.values())}
        stats.count("waits moved", moved)
        stats.count("nodes overlapped", sum(after.values()))
        return stats

    @staticmethod
    def schedule(graph: fx.Graph) -> list[fx.Node]:
        deps = dependency_graph(graph)
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        # nodes touching mutated values (KV writes and reads) and side effects keep their order
        mutated = mutated_inputs(graph)
        ordered = [
            n
            for n in nodes
            if n.op == "call_function"
            and (is_side_effecting(n) or any(a in mutated for a in n.all_input_nodes))
        ]
        deps.add_edges_from(zip(ordered, ordered[1:], strict=False))
        rank = {n: 0 if n.target in ISSUES else 2 if n.target == WAIT else 1 for n in nodes}
        pending = {n: deps.in_degree(n) for n in nodes}
        ready = [(rank[n], index[n], n) for n in nodes if pending[n] == 0]
        heapq.heapify(ready)
        out = []
        while ready:
            _, _, node = heapq.heappop(ready)
            out.append(node)
            for user in deps.successors(node):
                pending[user] -= 1
                if pending[user] == 0:
                    heapq.heappush(ready, (rank[user], index[user], user))
        assert len(out) == len(nodes), "the dependency graph has a cycle"
        return out
