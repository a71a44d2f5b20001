"""The overlap of compute and communication: microbatch_overlap on a small row-parallel module
(one-rank gloo group: an all-reduce over one rank is the identity, so numbers must not move),
the cost model's replay on hand-made schedules, the measured all-reduce profile, and how the
compiler turns predictions into a per-size table."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import count_ops, export, group_fixture, run_passes  # noqa: F401 (fixture)
from torch import fx, nn

from xllm_compile import comm_profile, overlap
from xllm_compile.buckets import select_variant
from xllm_compile.errors import ConfigError
from xllm_compile.passes import PassContext, PassManager, run_graph
from xllm_compile.passes.cost_model import replay, step_cost
from xllm_compile.passes.microbatch_overlap import MicrobatchOverlap
from xllm_compile.passes.schedule_collectives import ScheduleCollectives

c10d, xllm, aten = torch.ops._c10d_functional, torch.ops.xllm, torch.ops.aten


class Layers(nn.Module):
    """Two 'layers' of row-parallel matmul + all-reduce + add/RMSNorm + MLP + all-reduce, with a
    cumulative sum (like attention: it mixes tokens) between them."""

    def __init__(self, group: str) -> None:
        super().__init__()
        self.group = group
        torch.manual_seed(0)
        self.wo = nn.ParameterList([nn.Parameter(torch.randn(16, 8) / 4) for _ in range(2)])
        self.wd = nn.ParameterList([nn.Parameter(torch.randn(16, 16) / 4) for _ in range(2)])
        self.norm = nn.Parameter(torch.ones(16))
        self.wq = nn.Parameter(torch.randn(8, 16) / 4)

    def reduce(self, y):
        return c10d.wait_tensor(c10d.all_reduce(y, "sum", self.group))

    def forward(self, input_ids, x, residual):
        for i in range(2):
            a = self.reduce(F.linear(x, self.wo[i]))
            h, residual = xllm.fused_add_rms_norm(a, residual, self.norm, 1e-6)
            d = self.reduce(F.linear(F.silu(h), self.wd[i]))
            h, residual = xllm.fused_add_rms_norm(d, residual, self.norm, 1e-6)
            x = torch.cumsum(F.linear(h, self.wq), 0)  # mixes tokens: bounds the regions
        return x + input_ids.unsqueeze(-1), residual


def inputs(tokens: int):
    g = torch.Generator().manual_seed(tokens)
    return torch.arange(tokens), torch.randn(tokens, 8, generator=g), torch.randn(tokens, 16)


def _calls(gm, target) -> list[int]:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return [i for i, n in enumerate(nodes) if n.target == target]


@pytest.mark.parametrize("tokens", [2, 7, 16])
def test_microbatch_halves_every_region(group, tokens):
    ep = export(Layers(group), *inputs(4))
    ctx = PassContext.from_exported(ep, inputs(tokens))
    before = run_graph(ctx)
    records = PassManager([MicrobatchOverlap(min_tokens=1), ScheduleCollectives()], True).run(ctx)
    after = run_graph(ctx)
    for (_, a), (_, b) in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    mb, sched = (r["stats"] for r in records)
    assert mb["matches"] == 4  # two layers, 2 all-reduces each
    assert mb["details"]["regions"] == 1  # the residual stream joins the layers' row-wise ops
    assert count_ops(ctx.gm, c10d.all_reduce) == 8
    assert count_ops(ctx.gm, xllm.fused_add_rms_norm) == 8
    assert sched["details"]["waits_moved"] >= 4
    # interleaved: half B's first matmul runs between half A's issue and its wait
    ar, waits = _calls(ctx.gm, c10d.all_reduce.default), _calls(ctx.gm, c10d.wait_tensor.default)
    linears = _calls(ctx.gm, aten.linear.default)
    assert ar[0] < linears[1] < waits[0]


def test_microbatch_below_the_minimum_keeps_one_half(group):
    """Fewer tokens than the minimum: half A takes every row, B is empty; numbers unchanged."""
    ep = export(Layers(group), *inputs(4))
    records, ctx, err = run_passes(ep, ["microbatch_overlap"], inputs(5))
    assert err < 1e-6 and records[0]["stats"]["details"]["min_half_tokens"] == 256
    assert count_ops(ctx.gm, c10d.all_reduce) == 8


def test_microbatch_skips_programs_without_collectives():
    ep = export(nn.Linear(8, 8), torch.randn(4, 8))
    [record], _, _ = run_passes(ep, ["microbatch_overlap"], (torch.randn(2, 8),))
    assert "no collectives" in record["skipped"]


def _schedule(order: list[str]) -> tuple[fx.Graph, dict[str, float]]:
    """A graph of l1 -> all_reduce -> wait and an independent l2, in `order`."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    made: dict[str, fx.Node] = {}
    for name in order:
        if name in ("l1", "l2"):
            made[name] = graph.call_function(aten.relu.default, (x,))
        elif name == "ar":
            made[name] = graph.call_function(c10d.all_reduce.default, (made["l1"], "sum", "g"))
        else:
            made[name] = graph.call_function(c10d.wait_tensor.default, (made["ar"],))
        made[name].name = name
    graph.output((made["wait"], made["l2"]))
    return graph, {"l1": 1e-3, "l2": 3e-3, "ar": 0.0, "wait": 0.0}


def test_replay_hides_a_collective_behind_independent_work():
    comm = lambda nbytes: 2e-3  # noqa: E731
    early, times = _schedule(["l1", "ar", "l2", "wait"])
    cost = replay(early, times, {"ar": 1024}, comm)
    assert cost.predicted_s == pytest.approx(4e-3) and cost.exposed_s == pytest.approx(0)
    late, times = _schedule(["l1", "ar", "wait", "l2"])
    cost = replay(late, times, {"ar": 1024}, comm)
    assert cost.predicted_s == pytest.approx(6e-3) and cost.exposed_s == pytest.approx(2e-3)
    assert cost.comm_s == pytest.approx(2e-3) and cost.compute_s == pytest.approx(4e-3)
    # a machine where compute hides none of a collective (measured overlap 0): serial time,
    # and half of the hidden part at overlap 0.5
    early, times = _schedule(["l1", "ar", "l2", "wait"])
    assert replay(early, times, {"ar": 1024}, comm, overlap=0.0).predicted_s == pytest.approx(6e-3)
    assert replay(early, times, {"ar": 1024}, comm, overlap=0.5).predicted_s == pytest.approx(5e-3)


def test_step_cost_measures_a_real_graph(group):
    ep = export(Layers(group), *inputs(4))
    args = [*(p.detach() for p in ep.state_dict.values()), *inputs(8)]
    cost = step_cost(ep.graph_module, args, lambda nbytes: 1e-3 + nbytes * 1e-9)
    assert cost.comm_s == pytest.approx(4 * (1e-3 + 8 * 16 * 4 * 1e-9))
    # nothing moves past a wait in the traced order: every collective is exposed
    assert cost.exposed_s >= cost.comm_s * 0.99 and cost.compute_s > 0


def test_comm_profile_interpolates_and_reads_back(tmp_path):
    profile = comm_profile.CommProfile("gloo", 2, ((256, 1e-4), (1024, 2e-4), (4096, 8e-4)))
    assert profile.all_reduce_s(640) == pytest.approx(1.5e-4)
    assert profile.all_reduce_s(8192) == pytest.approx(1.6e-3)  # the last slope, extended
    assert profile.all_reduce_s(1) == pytest.approx(1e-4)  # never below the smallest
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_dict()))
    assert comm_profile.read(path, 2).points == profile.points
    with pytest.raises(ConfigError, match="measured on 2 ranks, not 4"):
        comm_profile.read(path, 4)
    path.write_text('{"points": [[1, 2]]}')
    with pytest.raises(ConfigError, match="not a communication profile"):
        comm_profile.read(path, 2)


def test_comm_profile_measures_real_ranks():
    profile = comm_profile.measure(2, sizes=(1024, 65536, 1 << 20))
    times = [t for _, t in profile.points]
    assert [b for b, _ in profile.points] == [1024, 65536, 1 << 20]
    assert all(t > 0 for t in times) and times == sorted(times)
    assert 0.0 <= profile.overlap <= 1.0


def _costs(*per_variant: list[float]) -> dict[str, list[dict]]:
    names = ["base", "chunk", "microbatch"]
    return {n: [{"predicted_ms": ms} for ms in v] for n, v in zip(names, per_variant, strict=True)}


def test_the_table_takes_a_variant_only_past_the_margin():
    sizes = [1, 128, 2048]
    costs = _costs([1.0, 2.0, 10.0], [1.5, 1.99, 9.0], [1.2, 2.5, 8.0])
    picked = overlap.winners(costs)
    assert picked == ["base", "base", "microbatch"]  # chunk's 0.5% at 128 is under the margin
    table = overlap.table(sizes, picked)
    assert table == [[128, "base"], [None, "microbatch"]]
    assert [select_variant(table, t) for t in (1, 128, 129, 5000)] == [
        "base",
        "base",
        "microbatch",
        "microbatch",
    ]
