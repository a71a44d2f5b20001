"""Compiled artifacts against transformers, per family: logits for prefill and 20 decode steps,
32 greedy tokens, ragged batches, and bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from xllm_compile.runtime import load

from conftest import FAMILIES, compile_cli
from helpers import hf_greedy, hf_logits, prefill_then_decode, rel_err

PROMPT = [1, 17, 93, 250, 4, 61, 77, 300, 12, 45, 201, 9]  # 12 tokens: longer than mistral's window


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_logits_prefill_and_decode(family, family_models):
    model, _, art = family_models(family)
    continuation = hf_greedy(model, PROMPT, 20)
    ref = hf_logits(model, PROMPT + continuation)  # [32, V]
    out = prefill_then_decode(load(art), PROMPT, continuation)
    assert out.shape == ref.shape
    assert rel_err(out[: len(PROMPT)], ref[: len(PROMPT)]) < 1e-4  # prefill
    assert rel_err(out[len(PROMPT) :], ref[len(PROMPT) :]) < 1e-4  # 20 decode steps


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_match_transformers(family, family_models):
    model, _, art = family_models(family)
    expected = hf_greedy(model, PROMPT, 32)
    [result] = load(art).generate([PROMPT], max_tokens=32, ignore_eos=True)
    assert result.token_ids == expected
    assert result.finish_reason == "length"


@pytest.mark.parametrize("family", ["llama3", "qwen3", "mistral"])
def test_ragged_batch_equals_each_prompt_alone(family, family_models):
    model, _, art = family_models(family)
    prompts = [PROMPT[:3], PROMPT + [5, 6, 7, 8, 9], PROMPT[:7]]
    engine = load(art)
    together = engine.generate(prompts, max_tokens=16, ignore_eos=True)
    alone = [engine.generate([p], max_tokens=16, ignore_eos=True)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[1].token_ids == hf_greedy(model, prompts[1], 16)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_bf16_logits_within_2e_2(family, family_models, tmp_path):
    model, model_dir, _ = family_models(family)
    art = compile_cli(model_dir, tmp_path / "bf16", "--dtype", "bfloat16")
    # a copy: casting the session's shared model to bf16 and back would round its weights
    ref = hf_logits(copy.deepcopy(model).to(torch.bfloat16), PROMPT)
    out = prefill_then_decode(load(art), PROMPT, [])
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


def test_generate_cli_prints_the_engine_tokens(llama_artifact, capsys):
    from xllm_compile.cli import main

    ids = ",".join(map(str, PROMPT))
    assert main(["generate", str(llama_artifact), "--token-ids", ids, "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    [expected] = load(llama_artifact).generate([PROMPT], max_tokens=8)
    assert printed == ",".join(map(str, expected.token_ids))
