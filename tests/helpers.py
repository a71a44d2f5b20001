"""Test helpers: run prompts through the compiled program and through transformers."""

from __future__ import annotations

import torch

from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: the tolerance measure used against transformers."""
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max())


def prefill_then_decode(engine, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits [len(prompt) + len(continuation), V]: every prompt position from one prefill step,
    then one decode step per continuation token (each fed as the next input)."""
    seq = Sequence(list(prompt), SamplingParams())
    seq.slot = engine.kv_cache.allocate(len(prompt) + len(continuation))
    try:
        rows = [engine.executor.run([seq], engine.kv_cache.tensor, all_logits=True)]
        for token in continuation:
            seq.output_ids.append(token)
            rows.append(engine.executor.run([seq], engine.kv_cache.tensor))
    finally:
        engine.kv_cache.free(seq.slot)
    return torch.cat(rows)


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids], device=model.device)).logits[0]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation by transformers (full forward each step: tiny models, and no reliance on
    its cache API); eos is an ordinary token: not stopped at, not suppressed."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]
