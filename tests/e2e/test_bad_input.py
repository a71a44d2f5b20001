"""Bad input through the real CLI processes: one line on stderr naming the problem, exit 2, no
traceback, and nothing lost (an existing artifact survives a failed compile)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import compile_cli
from helpers import assert_one_line_error, run_cli


@pytest.fixture
def model_copy(family_models, tmp_path):
    _, model_dir, _ = family_models("llama3")
    return shutil.copytree(model_dir, tmp_path / "model")


def test_missing_config(model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    proc = run_cli("compile", str(model_copy), "--out", str(tmp_path / "a"), "--quiet")
    assert_one_line_error(proc, "config.json not found")


def test_missing_model_folder(tmp_path):
    proc = run_cli("compile", str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert_one_line_error(proc, "model folder not found")


def test_unknown_architecture(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(config))
    proc = run_cli("compile", str(model_copy), "--out", str(tmp_path / "a"), "--quiet")
    assert_one_line_error(proc, "GPT2LMHeadModel", "not supported", "LlamaForCausalLM")


def test_corrupt_safetensors(model_copy, tmp_path):
    (model_copy / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    proc = run_cli("compile", str(model_copy), "--out", str(tmp_path / "a"), "--quiet")
    assert_one_line_error(proc, "model.safetensors", "corrupt")


@pytest.mark.parametrize("change", ["missing", "shape", "unexpected"])
def test_weight_mismatch_names_the_tensor(model_copy, tmp_path, change):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    if change == "missing":
        del tensors[name]
    elif change == "shape":
        tensors[name] = tensors[name][:, :-1].contiguous()
    else:
        name = "model.layers.1.mlp.extra.weight"
        tensors[name] = tensors["model.norm.weight"].clone()
    save_file(tensors, path)
    proc = run_cli("compile", str(model_copy), "--out", str(tmp_path / "a"), "--quiet")
    assert_one_line_error(proc, name)


def test_failed_compile_keeps_existing_artifact(model_copy, tmp_path):
    art = compile_cli(model_copy, tmp_path / "art")
    before = (art / "manifest.json").read_text()
    (model_copy / "model.safetensors").write_bytes(b"broken")
    proc = run_cli("compile", str(model_copy), "--out", str(art), "--quiet")
    assert proc.returncode == 2
    assert (art / "manifest.json").read_text() == before
    assert not list(tmp_path.glob(".art.xllm-*"))


@pytest.fixture
def artifact_copy(llama_artifact, tmp_path):
    return shutil.copytree(llama_artifact, tmp_path / "art")


@pytest.mark.parametrize("how", ["flip_byte", "truncate", "delete"])
def test_tampered_artifact_is_refused(artifact_copy, how):
    weights = artifact_copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "truncate":
        weights.write_bytes(bytes(data[:-100]))
    else:
        weights.unlink()
    proc = run_cli("generate", str(artifact_copy), "--token-ids", "1,2,3")
    assert_one_line_error(proc, "weights.safetensors", "recompile")


def test_artifact_from_another_format_version(artifact_copy):
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["format_version"] = 999
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("inspect", str(artifact_copy))
    assert_one_line_error(proc, "format 999")


def test_prompt_longer_than_maximum(model_copy, tmp_path):
    art = compile_cli(model_copy, tmp_path / "short", "--max-model-len", "16")
    proc = run_cli("generate", str(art), "--token-ids", ",".join(["5"] * 20))
    assert_one_line_error(proc, "20 tokens", "at most 15")


def test_text_prompt_without_tokenizer(llama_artifact):
    proc = run_cli("generate", str(llama_artifact), "--prompt", "hello")
    assert_one_line_error(proc, "no tokenizer")


def test_inspect_into_a_closed_pipe_is_quiet(llama_artifact):
    """`xllm inspect --json | head`: the reader leaving early is not a traceback."""
    cmd = [sys.executable, "-m", "xllm_compile", "inspect", str(llama_artifact), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before it writes anything: every write is EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_cuda_graphs_on_a_cpu_is_one_line(llama_artifact):
    proc = run_cli(
        "generate", str(llama_artifact), "--token-ids", "1,2", "--graph-cache", "cuda_graph"
    )
    assert_one_line_error(proc, "cuda_graph", "CUDA device")
