"""Checkpoint layouts: a sharded checkpoint (index file) compiles to the same weights as one file;
the manifest and `xllm inspect` describe the artifact."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from xllm_compile.cli import main

from conftest import compile_cli, make_hf_model


def test_sharded_checkpoint_equals_single_file(tmp_path, llama_artifact):
    model = make_hf_model("llama3", tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    single = load_file(compile_cli(tmp_path / "single", tmp_path / "a1") / "weights.safetensors")
    sharded = load_file(compile_cli(tmp_path / "sharded", tmp_path / "a2") / "weights.safetensors")
    assert single.keys() == sharded.keys()
    assert all(single[k].equal(sharded[k]) for k in single)


def test_manifest_and_inspect(llama_artifact, capsys):
    manifest = json.loads((llama_artifact / "manifest.json").read_text())
    assert manifest["model"]["family"] == "llama"
    assert manifest["dtype"] == "float32"
    assert set(manifest["files"]) >= {"program.json", "weights.safetensors"}
    weights = load_file(llama_artifact / "weights.safetensors")
    assert list(weights) and set(weights) == set(manifest["program"]["params"])
    assert main(["inspect", str(llama_artifact)]) == 0
    table = capsys.readouterr().out
    assert "llama (LlamaForCausalLM)" in table and "llama3 theta=500000" in table
    assert manifest["files"]["weights.safetensors"]["sha256"][:16] in table
