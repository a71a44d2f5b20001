"""Shared fixtures: tiny random-weight models of each family built with transformers from
real-shaped configs, saved as safetensors into tmp folders, and compiled through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import xllm_compile  # noqa: F401  (first: it takes the checkout's root off sys.path, see there)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on the CPU under Triton's interpreter where no GPU is (CI): the variable is
# read when a kernel is decorated, so it is set before any test imports kernels/triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small configs with the real shape of each family: GQA, per-family switches, rope variants.
BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    # Llama 3 style: llama3 rope scaling, untied embeddings
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    # Llama 2 style with linear rope scaling, attention bias and tied embeddings
    "llama_linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
            attention_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen2.5: q/k/v bias, tied embeddings (as the 0.5B model)
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    # Qwen3: q/k norm, head_dim not hidden/heads
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            head_dim=32,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    # Mistral with a sliding window shorter than the test prompts
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
}


def make_hf_model(family: str, out: Path, seed: int = 0):
    """Build a random-weight transformers model of `family`, save it to `out`, return it (fp32)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(out)
    return model


def compile_cli(model_dir: Path, out: Path, *extra: str) -> Path:
    from xllm_compile.cli import compile_main

    assert compile_main([str(model_dir), "--out", str(out), "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family -> (hf model, model dir, fp32 artifact dir); built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            model = make_hf_model(family, root / "hf")
            cache[family] = (model, root / "hf", compile_cli(root / "hf", root / "art"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def llama_artifact(family_models):
    return family_models("llama3")[2]


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """The embedded model (a tokenizer and a chat template) compiled once per session."""
    return compile_cli(EXAMPLE, tmp_path_factory.mktemp("tiny") / "art")


def rehash(art: Path) -> None:
    """Rewrite the manifest's sizes and sha256s after a test changed files, as an attacker
    would: the hashes prove integrity, not origin."""
    import json

    from xllm_compile.artifact import MANIFEST, sha256_file

    manifest = json.loads((art / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        meta.update(sha256=sha256_file(art / name), bytes=(art / name).stat().st_size)
    (art / MANIFEST).write_text(json.dumps(manifest))
