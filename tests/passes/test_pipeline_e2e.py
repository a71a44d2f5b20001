"""The default pipeline on every family, through the CLI: fused-op counts, nothing unfused left,
one merged qkv and gate_up matmul per layer, the pass log in the manifest; `--passes none`.

Counting the RMSNorm family: the 2*layers+1 hidden-state norms (input, post-attention, final)
are one xllm::rms_norm (layer 0's input norm, fed by the embedding) plus 2*layers
xllm::fused_add_rms_norm (every later norm follows a residual add). Qwen3's q/k norms run over
head_dim on [T, H, D] and are counted apart: 2*layers more xllm::rms_norm.
"""

from __future__ import annotations

import json

import pytest
import torch

from xllm_compile import program_format
from xllm_compile.artifact import MANIFEST, PROGRAM
from xllm_compile.passes import pass_names
from xllm_compile.passes.graph_utils import count_ops

from conftest import BASE, FAMILIES, compile_cli

xllm, aten = torch.ops.xllm, torch.ops.aten
LAYERS = BASE["num_hidden_layers"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_pipeline_counts(family, family_models):
    _, _, art = family_models(family)
    gm = program_format.load(art / PROGRAM)
    qk_norms = 2 * LAYERS if family == "qwen3" else 0
    assert count_ops(gm, xllm.fused_add_rms_norm) == 2 * LAYERS
    assert count_ops(gm, xllm.rms_norm) == 1 + qk_norms
    assert count_ops(gm, xllm.silu_and_mul) == LAYERS
    assert count_ops(gm, xllm.rotary_embedding) == LAYERS
    # per layer: qkv, o_proj, gate_up, down; plus the LM head: all on the CPU linear kernel
    assert count_ops(gm, xllm.linear) == 4 * LAYERS + 1 and count_ops(gm, aten.linear) == 0
    for unfused in (aten.rsqrt, aten.pow, aten.mean, aten.silu, aten.neg, aten.cat, aten.add):
        assert count_ops(gm, unfused) == 0, unfused
    manifest = json.loads((art / MANIFEST).read_text())
    log = manifest["passes"]
    assert [p["name"] for p in log] == pass_names()
    by_name = {p["name"]: p["stats"] for p in log}
    assert by_name["merge_qkv"]["matches"] == LAYERS
    assert by_name["merge_gate_up"]["matches"] == LAYERS
    assert by_name["fuse_rotary"]["details"]["unpaired"] == 0
    assert by_name["lower_ops"]["replaced"]["aten.linear -> xllm::linear"] == 4 * LAYERS + 1
    assert by_name["lower_ops"]["details"]["bindings"]["xllm::linear"] == "cpu kernel"
    params = manifest["program"]["params"]
    assert sum(p.endswith("qkv_proj.weight") for p in params) == LAYERS
    assert not any(p.endswith(("q_proj.weight", "gate_proj.weight")) for p in params)


def test_passes_none_keeps_the_traced_graph(family_models, tmp_path):
    _, model_dir, _ = family_models("llama3")
    art = compile_cli(model_dir, tmp_path / "plain", "--passes", "none")
    gm = program_format.load(art / PROGRAM)
    assert count_ops(gm, xllm.rms_norm) == 0 and count_ops(gm, aten.rsqrt) == 2 * LAYERS + 1
    assert json.loads((art / MANIFEST).read_text())["passes"] == []


def test_cli_list_passes_and_bad_name(capsys, tmp_path):
    from xllm_compile.cli import compile_main

    assert compile_main(["--list-passes"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == pass_names(optional=True)
    assert compile_main([str(tmp_path), "--out", str(tmp_path / "a"), "--passes", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_inspect_shows_the_pass_table(llama_artifact):
    from xllm_compile.tools.inspect_artifact import inspect_artifact

    text = inspect_artifact(str(llama_artifact))
    table = text[text.index("passes") :]
    assert "fuse_rms_norm" in table and "nodes" in table and "matches" in table
