"""fuse_allreduce_norm: a row-parallel all-reduce feeding the residual add + RMSNorm ->
xllm::all_reduce_add_rms_norm, one op a backend can implement as one pass over the data.

Before:  w = wait_tensor(all_reduce(y, "sum", g)); f = xllm.fused_add_rms_norm(w, res, W, eps)
After:   f = xllm.all_reduce_add_rms_norm(y, res, W, eps, g)

Optional (`--passes +fuse_allreduce_norm`): on CPU the op is the composite (no faster), and it
hides the wait from schedule_collectives; it is here for the fused CUDA kernel to come. Left
alone: an all-reduce with another user than the norm, a chunked one (its waits meet in a cat).
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.graph_utils import has_collectives
from xllm_compile.passes.match import call, is_call, only_user

c10d, xllm = torch.ops._c10d_functional, torch.ops.xllm


def reduced_input(norm: fx.Node) -> tuple[int, fx.Node] | None:
    """(argument index, all_reduce node) of the norm's input that is a waited all-reduce(sum)
    used by nothing else."""
    for i in (0, 1):
        wait = norm.args[i]
        if not is_call(wait, c10d.wait_tensor.default) or only_user(wait) is not norm:
            continue
        ar = wait.args[0]
        if is_call(ar, c10d.all_reduce.default) and ar.args[1] == "sum" and only_user(ar) is wait:
            return i, ar
    return None


class FuseAllReduceNorm(Pass):
    name = "fuse_allreduce_norm"
    VERSION = 1
    description = "all-reduce + residual add + RMSNorm -> xllm::all_reduce_add_rms_norm"

    def applies(self, ctx: PassContext) -> str | None:
        if not has_collectives(ctx.gm.graph):
            return "no collectives (not a tensor-parallel program)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats, graph = PassStats(), gm.graph
        for norm in [n for n in graph.nodes if is_call(n, xllm.fused_add_rms_norm.default)]:
            found = reduced_input(norm)
            if found is None:
                continue
            i, ar = found
            wait = norm.args[i]
            residual, weight, eps = norm.args[1 - i], norm.args[2], norm.args[3]
            with graph.inserting_before(norm):
                fused = call(
                    graph,
                    xllm.all_reduce_add_rms_norm.default,
                    (ar.args[0], residual, weight, eps, ar.args[2]),
                    like=norm,
                )
            norm.replace_all_uses_with(fused)
            for node in (norm, wait, ar):
                graph.erase_node(node)
            stats.matches += 1
            stats.count("all_reduce + fused_add_rms_norm")
        return stats
