"""The communication passes on a small row-parallel module, run on a one-rank gloo group (an
all-reduce over one rank is the identity, so numbers must not move): chunk_allreduce splits
the matmul + all-reduce, schedule_collectives moves the waits, fuse_allreduce_norm fuses the
norm; near misses are left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import count_ops, export, group_fixture, run_passes  # noqa: F401 (fixture)
from torch import nn

from xllm_compile import program_format
from xllm_compile.passes.schedule_collectives import WAIT

c10d, xllm, aten = torch.ops._c10d_functional, torch.ops.xllm, torch.ops.aten


class RowParallel(nn.Module):
    """Two row-parallel matmuls (all-reduced) and a near miss: one with a bias before the sum."""

    def __init__(self, group: str) -> None:
        super().__init__()
        self.group = group
        self.w1, self.w2 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16, 8))
        self.norm = nn.Parameter(torch.ones(16))

    def reduce(self, y):
        return c10d.wait_tensor(c10d.all_reduce(y, "sum", self.group))

    def forward(self, x, residual):
        a = self.reduce(F.linear(x, self.w1))
        normed, residual = xllm.fused_add_rms_norm(a, residual, self.norm, 1e-6)
        b = self.reduce(F.linear(x, self.w2, self.norm))  # biased: not chunked
        return normed + b, residual


def inputs(tokens: int):
    torch.manual_seed(tokens)
    return torch.randn(tokens, 8), torch.randn(tokens, 16)


@pytest.mark.parametrize("tokens", [1, 2, 7])
def test_chunks_then_schedule(group, tokens):
    ep = export(RowParallel(group), *inputs(4))
    records, ctx, err = run_passes(ep, ["chunk_allreduce", "schedule_collectives"], inputs(tokens))
    assert err < 1e-6  # the chunks' rows are the rows of the whole matmul
    chunk, schedule = (r["stats"] for r in records)
    assert chunk["matches"] == 1 and chunk["details"]["collectives_added"] == 1
    assert count_ops(ctx.gm, c10d.all_reduce) == 3 and count_ops(ctx.gm, aten.cat) == 1
    # every wait moved: the two chunks and the biased matmul are independent of one another
    assert schedule["details"]["waits_moved"] == 3
    order = [n for n in ctx.gm.graph.nodes if n.op == "call_function"]
    first_wait = next(i for i, n in enumerate(order) if n.target == WAIT)
    reduces = [i for i, n in enumerate(order) if n.target == c10d.all_reduce.default]
    assert reduces[1] < first_wait  # both chunks issued before either is waited on


def test_schedule_alone_moves_nothing_it_cannot(group):
    ep = export(RowParallel(group), *inputs(4))
    [schedule], _, err = run_passes(ep, ["schedule_collectives"], inputs(3))
    assert err < 1e-6
    # the second matmul does not need the first all-reduce: its issue moves up, past the wait
    assert schedule["stats"]["details"]["nodes_overlapped"] >= 1


def test_fuse_allreduce_norm(group):
    ep = export(RowParallel(group), *inputs(4))
    [fuse], ctx, err = run_passes(ep, ["fuse_allreduce_norm"], inputs(5))
    assert err < 1e-6 and fuse["stats"]["matches"] == 1
    assert count_ops(ctx.gm, xllm.all_reduce_add_rms_norm) == 1
    assert count_ops(ctx.gm, xllm.fused_add_rms_norm) == 0
    assert count_ops(ctx.gm, c10d.all_reduce) == 1  # the biased one, unfused


def test_bind_group_rebinds_every_collective(group):
    ep = export(RowParallel(group), *inputs(4))
    run_passes(ep, ["fuse_allreduce_norm"], inputs(2))
    assert program_format.bind_group(ep.graph_module, "elsewhere") == 2
    named = [
        n.args[-1]
        for n in ep.graph_module.graph.nodes
        if n.target in (c10d.all_reduce.default, xllm.all_reduce_add_rms_norm.default)
    ]
    assert named == ["elsewhere", "elsewhere"]


def test_passes_skip_programs_without_collectives():
    ep = export(nn.Linear(8, 8), torch.randn(4, 8))
    records, _, _ = run_passes(
        ep, ["chunk_allreduce", "schedule_collectives"], (torch.randn(2, 8),)
    )
    assert all("no collectives" in r["skipped"] for r in records)


@pytest.mark.parametrize(
    ("min_tokens", "tokens", "rows"), [(1, 7, [4, 3]), (4, 5, [4, 1]), (8, 5, [5, 0])]
)
def test_chunk_sizes_follow_min_tokens(group, min_tokens, tokens, rows):
    """Chunks are ceil(T / k) rows, but never fewer than min_tokens (then the last is empty)."""
    from xllm_compile.passes import PassContext, PassManager, run_graph
    from xllm_compile.passes.chunk_allreduce import ChunkAllReduce

    ep = export(RowParallel(group), *inputs(4))
    ctx = PassContext.from_exported(ep, inputs(tokens))
    before = run_graph(ctx)
    PassManager([ChunkAllReduce(min_tokens=min_tokens)], verify=True).run(ctx)
    after = run_graph(ctx)
    for (_, a), (_, b) in zip(after, before, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    cat = next(n for n in ctx.gm.graph.nodes if n.target == aten.cat.default)
    interp = torch.fx.Interpreter(ctx.gm, garbage_collect_values=False)
    interp.run(*[ctx.weights[n] for n in ctx.param_order()], *inputs(tokens))
    assert [interp.env[n].shape[0] for n in cat.args[0]] == rows
