"""microbatch_overlap: the two-stream trick of xLLM (and of DeepSeek's serving), on the CPU as two
interleaved halves of the ragged batch. A step's tokens are split in two and every region of
row-wise ops that holds an all-reduce is computed once per half, so that half A's all-reduce
runs (gloo: on its own thread) while half B computes, and the other way round.

A region is a connected set of row-wise nodes (row i of each output depends on row i of each
token-shaped input only): the matmuls, norms, activations, residual adds and all-reduces from
one layer's attention output to the next layer's q/k/v projection. Attention, the KV writes and
the logits gather need every token and bound the regions.

Before:  o = linear(attn, Wo); w = wait(all_reduce(o)); h, r = add_rms_norm(w, r); ...
         d = linear(silu_mul(gate_up(h)), Wd); w2 = wait(all_reduce(d)); ...; qkv = linear(...)
After:   h = min(T, max((T + 1) // 2, MIN))        # T tokens, symbolic
         attn_A, attn_B = attn[:h], attn[h:]; r_A, r_B = r[:h], r[h:]
         (the region once on the A rows, once on the B rows)
         qkv = cat([qkv_A, qkv_B]); r' = cat([r'_A, r'_B])
         (schedule_collectives then issues A's all-reduce, computes B, waits for A late...)

Below 2 * MIN tokens half B is short, below MIN it is empty (its collectives are still issued:
~65 us each on gloo), so a program with this pass is for prefill-sized steps: the compiler's
overlap choice (passes/overlap_choice.py) uses it only for the buckets where the cost model
predicts a gain; alone it is an OPTIONAL pass (`--passes +microbatch_overlap`).
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.graph_utils import has_collectives, set_meta_val
from xllm_compile.passes.match import aten, call, val

c10d, xllm = torch.ops._c10d_functional, torch.ops.xllm
MIN_HALF_TOKENS = 256  # as chunk_allreduce: below it a split costs more than it hides

COLLECTIVES = frozenset({c10d.all_reduce.default})
ROWWISE = frozenset(
    {
        aten.linear.default,
        xllm.linear.default,
        xllm.rms_norm.default,
        xllm.fused_add_rms_norm.default,
        xllm.silu_and_mul.default,
        aten.add.Tensor,
        aten.mul.Tensor,
        aten.silu.default,
        aten.gelu.default,
        aten.relu.default,
        aten.tanh.default,
        aten.sigmoid.default,
        aten.slice.Tensor,  # on a dimension other than the tokens (checked)
        operator.getitem,  # of a row-wise op's tuple
        c10d.wait_tensor.default,
        *COLLECTIVES,
    }
)


def token_dim(gm: fx.GraphModule):
    """The symbolic token count (the first dimension of input_ids), or None."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name == "input_ids":
            return val(node).shape[0]
    return None


class MicrobatchOverlap(Pass):
    name = "microbatch_overlap"
    VERSION = 1
    description = "row-wise regions with all-reduces run as two interleaved halves of the batch"

    def __init__(self, min_tokens: int = MIN_HALF_TOKENS) -> None:
        self.min_tokens = min_tokens

    def applies(self, ctx: PassContext) -> str | None:
        if not has_collectives(ctx.gm.graph):
            return "no collectives (not a tensor-parallel program)"
        if token_dim(ctx.gm) is None:
            return "no input_ids placeholder: not a decoder step program"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        graph = gm.graph
        tokens = token_dim(gm)
        params = {n for n in graph.nodes if n.op == "placeholder" and ctx.param_name(n)}
        regions = self.regions(graph, tokens, params)
        stats = PassStats(details={"min_half_tokens": self.min_tokens})
        if not regions:
            return stats
        ids = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "input_ids")
        first = min(min(r, key=_order(graph).__getitem__) for r in regions)
        with graph.inserting_before(first):
            size = call(graph, aten.sym_size.int, (ids, 0))
            half = call(graph, operator.floordiv, (call(graph, operator.add, (size, 1)), 2))
            if self.min_tokens > 1:
                half = call(graph, torch.sym_max, (half, self.min_tokens))
            half = call(graph, torch.sym_min, (half, size))
        split = sum(1 for r in regions for n in r if n.target in COLLECTIVES)
        for region in regions:
            self.split(graph, region, tokens, (size, half))
        stats.matches = split
        stats.count("all_reduce -> 2 micro-batches", split)
        stats.details.update(microbatches=2, regions=len(regions), collectives_added=split)
        return stats

    @staticmethod
    def regions(graph: fx.Graph, tokens, params: set) -> list[list[fx.Node]]:
        """Connected sets of row-wise nodes holding a collective, each in graph order."""
        expr = tokens.node.expr

        def token_shaped(n) -> bool:
            v = n.meta.get("val") if isinstance(n, fx.Node) else None
            vals = v if isinstance(v, tuple | list) else (v,)
            return all(
                isinstance(x, torch.Tensor)
                and x.dim() >= 1
                and isinstance(x.shape[0], torch.SymInt)
                and x.shape[0].node.expr == expr
                for x in vals
            )

        def rowwise(n: fx.Node) -> bool:
            if n.op != "call_function" or n.target not in ROWWISE or not token_shaped(n):
                return False
            if n.target == aten.slice.Tensor and n.args[1] in (0, -val(n).dim()):
                return False
            if n.target in COLLECTIVES and n.args[1] != "sum":
                return False
            # every tensor input is token-shaped, or a parameter (broadcast over the rows)
            return all(a in params or token_shaped(a) for a in n.all_input_nodes)

        g = nx.Graph()
        for n in graph.nodes:
            if rowwise(n):
                g.add_node(n)
                g.add_edges_from((a, n) for a in n.all_input_nodes if a in g)
        order = _order(graph)
        out = []
        for comp in nx.connected_components(g):
            if any(n.target in COLLECTIVES for n in comp):
                out.append(sorted(comp, key=order.__getitem__))
        return sorted(out, key=lambda r: order[r[0]])

    @staticmethod
    def split(graph: fx.Graph, region: list[fx.Node], tokens, bounds) -> None:
        """Compute `region` once per half, in place: each node's two copies go where it was,
        its outside users read the two halves joined."""
        size, half = bounds
        inside = set(region)
        cuts: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        envs: list[dict] = [{}, {}]
        for node in region:
            for a in node.all_input_nodes:
                if a in inside or a in cuts or not _is_token_tensor(a, tokens):
                    continue
                with graph.inserting_before(node):
                    cuts[a] = (
                        call(graph, aten.slice.Tensor, (a, 0, 0, half)),
                        call(graph, aten.slice.Tensor, (a, 0, half, size)),
                    )
            with graph.inserting_before(node):
                for i, env in enumerate(envs):

                    def arg(a, env=env, i=i):
                        if a in env:
                            return env[a]
                        return cuts[a][i] if a in cuts else a

                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg)
                    copy = graph.call_function(node.target, args, kwargs)
                    set_meta_val(copy)
                    copy.meta["stack_trace"] = node.meta.get("stack_trace")
                    env[node] = copy
            outside = [u for u in node.users if u not in inside]
            if outside:
                with graph.inserting_before(node):
                    joined = call(graph, aten.cat.default, ([envs[0][node], envs[1][node]], 0))
                for u in outside:
                    u.replace_input_with(node, joined)
        for node in reversed(region):
            graph.erase_node(node)


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _is_token_tensor(node: fx.Node, tokens) -> bool:
    v = val(node)
    return (
        v is not None
        and v.dim() >= 1
        and isinstance(v.shape[0], torch.SymInt)
        and v.shape[0].node.expr == tokens.node.expr
    )
