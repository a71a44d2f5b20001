"""chunk_allreduce: a row-parallel matmul and its all-reduce split into k token chunks, so that
chunk i's all-reduce runs (gloo: on its own thread; NCCL: on its stream) while chunk i+1's
matmul computes.

Before:  y = linear(x, W); r = all_reduce(y, "sum", g); out = wait_tensor(r)
After:   c = max((T + k - 1) // k, MIN)             # T = x.shape[0], symbolic
         y_i = linear(x[i*c : (i+1)*c], W)           # i = 0..k-1
         w_i = wait_tensor(all_reduce(y_i, "sum", g))
         out = cat([w_0, ..., w_k-1])
         (schedule_collectives then issues r_i at once and waits after the later chunks)

Applies only to tensor-parallel programs (there is no collective otherwise). The program is one
for every step size: below k * MIN tokens the first chunk takes every row and the others are
empty (their collectives are small overhead: the split happens only where it can pay), still a
cost at decode, so the pass is off in the default pipeline; `--passes ...,chunk_allreduce` turns it
on (tools/bench/bench_tp.py measures both). Left alone: a matmul with a bias or another user
of its result, and an all-reduce with another op than sum.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.graph_utils import has_collectives
from xllm_compile.passes.match import aten, call, is_call, only_user

c10d = torch.ops._c10d_functional
CHUNKS = 2
# Rows a chunk must have before a step is split: below it chunk 0 takes every row and the other
# chunks are empty (an empty gloo all-reduce still costs ~65 us against ~265 us for one row of
# 896, measured here). bench_tp: chunking won at 1024 prefill tokens, lost at 128 and at decode.
MIN_CHUNK_TOKENS = 256


def matches(wait: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(linear, all_reduce) feeding `wait`, when the pattern holds exactly."""
    ar = wait.args[0]
    if not is_call(ar, c10d.all_reduce.default) or ar.args[1] != "sum" or only_user(ar) is not wait:
        return None
    linear = ar.args[0]
    if not is_call(linear, aten.linear.default) or len(linear.args) != 2:
        return None
    return (linear, ar) if only_user(linear) is ar else None


class ChunkAllReduce(Pass):
    name = "chunk_allreduce"
    VERSION = 1
    description = "row-parallel matmul + all-reduce -> k token chunks, each reduced as it is done"

    def __init__(self, chunks: int = CHUNKS, min_tokens: int = MIN_CHUNK_TOKENS) -> None:
        self.chunks, self.min_tokens = chunks, min_tokens

    def applies(self, ctx: PassContext) -> str | None:
        if not has_collectives(ctx.gm.graph):
            return "no collectives (not a tensor-parallel program)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats = PassStats(details={"chunks": self.chunks, "min_chunk_tokens": self.min_tokens})
        graph = gm.graph
        waits = [n for n in graph.nodes if is_call(n, c10d.wait_tensor.default)]
        for wait in waits:
            found = matches(wait)
            if found is None:
                continue
            linear, ar = found
            x, weight = linear.args
            with graph.inserting_before(linear):
                size = call(graph, aten.sym_size.int, (x, 0))
                even = call(
                    graph,
                    operator.floordiv,
                    (call(graph, operator.add, (size, self.chunks - 1)), self.chunks),
                )
                step = (
                    call(graph, torch.sym_max, (even, self.min_tokens)) if self.min_tokens else even
                )
                done = []
                for i in range(self.chunks):
                    start = call(graph, operator.mul, (step, i)) if i else 0
                    end = call(graph, operator.mul, (step, i + 1))
                    part = call(graph, aten.slice.Tensor, (x, 0, start, end), like=linear)
                    y = call(graph, aten.linear.default, (part, weight), like=linear)
                    r = call(graph, c10d.all_reduce.default, (y, "sum", ar.args[2]))
                    # waited at once here; schedule_collectives moves each wait past the
                    # next chunks' matmuls (that is where the overlap comes from)
                    done.append(call(graph, c10d.wait_tensor.default, (r,)))
            with graph.inserting_before(wait):
                joined = call(graph, aten.cat.default, (done, 0), like=wait)
            wait.replace_all_uses_with(joined)
            for node in (wait, ar, linear):
                graph.erase_node(node)
            stats.matches += 1
            stats.count("linear + all_reduce -> chunks")
        stats.details["collectives_added"] = stats.matches * (self.chunks - 1)
        return stats
