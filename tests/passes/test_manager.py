"""PassManager: order, records, skip reasons, graph dumps, PassError naming the pass and the
passes before it (a crash, or numbers beyond tolerance), pipeline filtering; lower_ops."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import export, run_passes
from test_fuse_silu_mul import TwoMLPs
from test_merge_linears import export_attn

from xllm_compile.errors import ConfigError, PassError
from xllm_compile.passes import (
    Pass,
    PassContext,
    PassManager,
    PassStats,
    build_pipeline,
    parse_pass_list,
)
from xllm_compile.passes.graph_utils import critical_path, dependency_graph, liveness


class Breaks(Pass):
    name = "breaks"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


class Drifts(Pass):
    name = "drifts"

    def run(self, gm, ctx):
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.silu.default:
                node.target = torch.ops.aten.gelu.default  # a wrong rewrite
        return PassStats(matches=1)


def _ctx():
    ep = export(TwoMLPs(), torch.randn(4, 32))
    return PassContext.from_exported(ep, (torch.randn(3, 32),))


@pytest.mark.parametrize("bad", [Breaks, Drifts])
def test_pass_error_names_the_pass_and_those_before(bad):
    passes = [*build_pipeline(["cleanup", "fuse_rms_norm"]), bad()]
    with pytest.raises(PassError, match=rf"'{bad.name}'.*after passes: cleanup, fuse_rms_norm"):
        PassManager(passes, verify=True).run(_ctx())


def test_drift_message_names_the_worst_tensor():
    with pytest.raises(
        PassError, match=r"output 0 differs by .* torch.float32 allows 0.0001\) \(the first pass\)"
    ):
        PassManager([Drifts()], verify=True).run(_ctx())


def test_records_and_dumps(tmp_path):
    passes = build_pipeline(None, disable=["merge_qkv"])
    records = PassManager(passes, verify=True, dump_dir=tmp_path).run(_ctx())
    assert [r["name"] for r in records] == [p.name for p in passes]
    assert "merge_qkv" not in [r["name"] for r in records]
    for r in records:
        assert set(r) == {"name", "version", "stats", "time_s", "skipped"}
        assert (r["skipped"] or r["stats"]["nodes_before"] > 0) and r["time_s"] >= 0
    skipped = {r["name"]: r["skipped"] for r in records if r["skipped"]}
    assert skipped == {
        "quantize": "--quant none",
        "schedule_collectives": "no collectives (not a tensor-parallel program)",
    }
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[0] == "00_exported.py" and dumps[1] == "01_cleanup.py"
    assert dumps[-1] == f"{len(passes):02d}_lower_ops.py"
    assert "silu_and_mul" in (tmp_path / dumps[-1]).read_text()


def test_pipeline_filters_and_names():
    assert parse_pass_list("none") == () and parse_pass_list(None) is None
    assert [p.name for p in build_pipeline(("fuse_silu_mul", "cleanup"))] == [
        "cleanup",
        "fuse_silu_mul",
    ]  # pipeline order, whatever the order asked
    assert build_pipeline(()) == []
    with pytest.raises(ConfigError, match="unknown pass 'fuse_gelu'; passes: cleanup"):
        build_pipeline(["fuse_gelu"])


def test_lower_ops_binds_cpu_and_records_the_registrys_choice_elsewhere():
    ep = export(TwoMLPs(), torch.randn(4, 32))
    names = ["cleanup", "fuse_silu_mul", "lower_ops"]
    records, _, _ = run_passes(ep, names, (torch.randn(3, 32),))
    bindings = records[-1]["stats"]["details"]["bindings"]
    assert bindings == {"xllm::silu_and_mul": "cpu kernel", "xllm::linear": "cpu kernel"}
    ep = export(TwoMLPs(), torch.randn(4, 32))
    records, _, _ = run_passes(ep, names, (torch.randn(3, 32),), device="cuda")
    details = records[-1]["stats"]["details"]
    assert details["bindings"] == {"xllm::silu_and_mul": "triton"}  # triton is a dev dependency
    ep = export(TwoMLPs(), torch.randn(4, 32))
    records, _, _ = run_passes(ep, names, (torch.randn(3, 32),), device="npu")
    details = records[-1]["stats"]["details"]
    assert details["bindings"] == {"xllm::silu_and_mul": "reference"}  # no torch_npu here
    assert "torch_npu is not importable" in details["fallbacks"]["xllm::silu_and_mul"][0]


def test_graph_utils_on_attention_graph():
    ep = export_attn()
    graph = ep.graph_module.graph
    deps = dependency_graph(graph)
    store = next(n for n in graph.nodes if n.target == torch.ops.xllm.store_kv.default)
    attn = next(n for n in graph.nodes if n.target == torch.ops.xllm.attention.default)
    assert deps.has_edge(store, attn)  # attention reads what store_kv wrote
    path, length = critical_path(graph)
    assert store in path and attn in path and length >= 4
    live = liveness(graph)
    assert all(start <= end for start, end in live.values())
