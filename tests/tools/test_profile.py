"""`xllm profile`: the tables' contents on the embedded model (tiny-llama), the verify bisection
naming a pass broken on purpose, the trace and the HTML report (headless Chromium when the
machine has it), one kernel against its reference, and the bucket suggestion."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from xllm_compile.artifact import MANIFEST
from xllm_compile.cli import main
from xllm_compile.errors import ConfigError
from xllm_compile.passes import pass_names
from xllm_compile.passes import pipeline as pipeline_module
from xllm_compile.passes.fuse_silu_mul import FuseSiluMul
from xllm_compile.tools.profile import cache, kernel, ops, passes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"


@pytest.fixture(scope="module")
def profiled():
    return passes.profile_passes(
        EXAMPLE, batches=[1, 2], tokens=[16], rounds=1, decode_steps=2, prefill_repeats=1,
        verify=True, show_progress=False,
    )  # fmt: skip


def test_passes_lists_every_pass_with_the_pass_logs_node_delta(profiled, tiny_artifact):
    cuts = profiled["cuts"]
    assert [c["label"] for c in cuts] == ["none"] + [f"+{n}" for n in pass_names()]
    logged = {e["name"]: e for e in json.loads((tiny_artifact / MANIFEST).read_text())["passes"]}
    rendered = profiled["table"].render()
    for c in cuts[1:]:
        entry = logged[c["pass"]]
        assert c["skipped"] == entry["skipped"]
        if entry["skipped"]:
            continue
        s, e = c["stats"], entry["stats"]
        assert (s["nodes_before"], s["nodes_after"]) == (e["nodes_before"], e["nodes_after"])
        assert s["replaced"] == e["replaced"] and s["matches"] == e["matches"]
        for op in e["replaced"]:  # the fused ops are named in the table
            assert op in rendered
    fused = next(c for c in cuts if c["pass"] == "fuse_rms_norm")["stats"]["replaced"]
    assert fused.get("fused_add_rms_norm", 0) > 0
    for c in cuts:  # a time for every cut, bucket and prefill size
        assert set(c["decode"]) == {1, 2} and all(t.median_ms > 0 for t in c["decode"].values())
        assert c["prefill"][16].median_ms > 0


def test_verify_finds_no_drift_in_the_real_pipeline(profiled):
    assert profiled["first_drift"] is None
    assert all(c["error"] <= profiled["tolerance"] for c in profiled["cuts"])
    assert profiled["cuts"][0]["error"] == 0.0  # the reference is the first cut itself


class _BrokenSiluMul(FuseSiluMul):
    """fuse_silu_mul, then every fused node's output scaled by 1.05: a wrong rewrite."""

    def run(self, gm, ctx):
        stats = super().run(gm, ctx)
        for node in list(gm.graph.nodes):
            if node.target == torch.ops.xllm.silu_and_mul.default:
                with gm.graph.inserting_after(node):
                    scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 1.05))
                scaled.meta = dict(node.meta)  # same shape and dtype (the verifier wants "val")
                node.replace_all_uses_with(scaled, delete_user_cb=lambda u, s=scaled: u is not s)
        return stats


def test_verify_bisection_names_a_broken_pass(monkeypatch, capsys):
    broken = tuple(_BrokenSiluMul if p is FuseSiluMul else p for p in pipeline_module.PIPELINE)
    monkeypatch.setattr(pipeline_module, "PIPELINE", broken)
    args = ["profile", "passes", str(EXAMPLE), "--batch", "1", "--tokens", "8", "--rounds", "1",
            "--steps", "1", "--verify", "--quiet", "--json"]  # fmt: skip
    assert main(args) == 1  # drift: a non-zero exit
    out = json.loads(capsys.readouterr().out)
    assert out["first_drift"] == "fuse_silu_mul"
    errors = {c["label"]: c["error"] for c in out["cuts"]}
    assert errors["+merge_gate_up"] <= out["tolerance"] < errors["+fuse_silu_mul"]


def test_passes_refuses_what_is_not_a_model(tmp_path, capsys):
    assert main(["profile", "passes", str(tmp_path / "nothing"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model folder" in err[0]


def test_passes_takes_an_artifact_by_its_recorded_source(tiny_artifact, tmp_path):
    src = passes.resolve_source(tiny_artifact, tmp_path, None)
    assert src.model_dir.resolve() == EXAMPLE.resolve() and src.dtype == "float32"


@pytest.fixture(scope="module")
def decode_profile(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("ops")
    result = ops.profile_ops(
        tiny_artifact, phase="decode", batch=2, steps_=3, trace=out / "t.json", html=out / "r.html"
    )
    return result, out


def _graph_ops(art: Path) -> set[str]:
    from xllm_compile.runtime import load

    gm = load(art).runner.graph_module
    return {
        f"xllm::{n.target._overloadpacket.__name__}"
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith("xllm.")
    }


def test_ops_lists_the_graphs_xllm_ops_with_times(decode_profile, tiny_artifact):
    result, _ = decode_profile
    rows = {r["op"]: r for r in result["ops"]}
    wanted = _graph_ops(tiny_artifact)
    assert {"xllm::linear", "xllm::attention", "xllm::fused_add_rms_norm"} <= wanted
    for op in wanted:
        assert rows[op]["us_per_step"] > 0 and rows[op]["calls_per_step"] >= 1
    assert rows["xllm::attention"]["calls_per_step"] == 4  # one a layer
    assert rows["xllm::fused_add_rms_norm"]["unfused_us_per_step"] > 0  # its ATen equivalent
    assert rows["xllm::linear"]["gflop_s"] > 0 and rows["xllm::linear"]["gb_s"] > 0
    layers = [r["layer"] for r in result["layers"]]
    assert layers == ["embed", "layer 0", "layer 1", "layer 2", "layer 3", "final norm + lm_head"]
    assert abs(sum(r["share"] for r in result["layers"]) - 1) < 1e-6


def test_ops_trace_json_has_an_event_per_op(decode_profile):
    result, out = decode_profile
    events = json.loads((out / "t.json").read_text())["traceEvents"]
    counts = Counter(e.get("name") for e in events)
    for r in result["ops"]:
        if r["op"].startswith("xllm::"):
            assert counts[r["op"]] >= round(r["calls_per_step"] * 3), r["op"]


def test_ops_prefill_phase(tiny_artifact):
    result = ops.profile_ops(tiny_artifact, phase="prefill", tokens=24, steps_=2, unfused=False)
    rows = {r["op"]: r for r in result["ops"]}
    assert rows["xllm::linear"]["calls_per_step"] == 17 and result["what"] == "prefill 24 tokens"


def test_html_report_is_self_contained(decode_profile):
    _, out = decode_profile
    doc = (out / "r.html").read_text()
    assert "<svg" in doc and "<table>" in doc and "xllm::linear" in doc
    assert "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in doc


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (Debian's chromium package)")
def test_html_report_renders_in_headless_chromium(decode_profile, tmp_path):
    _, out = decode_profile
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--window-size=1300,2400", f"--screenshot={shot}"]  # fmt: skip
    proc = subprocess.run(
        [CHROMIUM, *flags, (out / "r.html").as_uri()], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == []  # no console errors (nor any console output)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # tables and bars, not blank


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_rms_norm_within_tolerance(dtype):
    result = kernel.profile_kernel("rms_norm", [(1, 576), (7, 1000)], dtype, min_time=0.005)
    assert [r["shape"] for r in result["rows"]] == ["1x576", "7x1000"]
    for r in result["rows"]:
        assert r["max_rel_err"] < result["tolerance"] and r["ok"]
        assert r["kernel_us"] > 0 and r["reference_us"] > 0 and r["gb_s"] > 0
    assert result["tolerance"] == kernel.TOLERANCE[getattr(torch, dtype)]


def test_kernel_cli_and_its_errors(capsys):
    assert main(["profile", "kernel", "linear_q", "--shapes", "1x64x96", "--qtype", "q8_0",
                 "--json"]) == 0  # fmt: skip
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert row["ok"] and row["gflop_s"] > 0
    assert main(["profile", "kernel", "nope"]) == 2
    assert "no kernel 'nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="takes TxH"):
        kernel.parse_shapes("1x2x3", "rms_norm")


def test_padding_and_suggestion_are_optimal():
    hist = Counter({1: 50, 2: 30, 3: 2, 5: 10, 12: 4})
    assert cache.padding(hist, [4, 12]) == {
        "real": 50 + 60 + 6 + 50 + 48, "padded": 4 * 82 + 12 * 14,
        "waste": 1 - 214 / (4 * 82 + 12 * 14), "uncovered_steps": 0,
    }  # fmt: skip
    for k in (1, 2, 3, 4):
        chosen = cache.suggest(hist, k)
        assert len(chosen) <= k and max(chosen) == 12  # every observed size is covered
        best = min(
            cache.padding(hist, [*combo, 12])["padded"]
            for combo in itertools.combinations(sorted(hist)[:-1], k - 1)
        )
        assert cache.padding(hist, chosen)["padded"] == best


def test_cache_shows_buckets_and_suggests_ones_covering_the_histogram(tiny_artifact, tmp_path):
    from xllm_compile.buckets import parse_buckets

    hist = tmp_path / "steps.txt"
    hist.write_text("# observed\ndecode 1 40\ndecode 3 12\n3\ndecode 6 5\nprefill 40 3\n")
    result = cache.profile_cache(tiny_artifact, hist, max_buckets=2, show_progress=False)
    phases = Counter(r["phase"] for r in result["buckets"])
    assert phases["decode"] > 0 and all(r["build_s"] > 0 for r in result["buckets"])
    decode = result["suggestion"]["decode"]
    assert len(decode) <= 2 and max(decode) >= 6
    assert result["suggestion"]["prefill"] == [40]
    parsed = parse_buckets(result["buckets_arg"], 64, 512, 4096)  # xllm-compile accepts it
    assert set(decode) <= set(parsed["decode_batch"]) and parsed["prefill_tokens"] == [40]


def test_cache_histogram_errors(tmp_path, tiny_artifact):
    bad = tmp_path / "bad.txt"
    bad.write_text("decode three\n")
    with pytest.raises(ConfigError, match="bad.txt:1"):
        cache.read_histogram(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        cache.read_histogram(tmp_path / "missing.txt")
