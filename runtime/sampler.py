"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xllm_compile.errors import RequestError

# Temperatures below this sample as greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-40
# overflows them to inf and the softmax to NaN.
MIN_TEMPERATURE = 1e-5
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, float)
        _check_number("top_p", self.top_p, float)
        _check_number("max_tokens", self.max_tokens, int)
        _check_number("top_k", self.top_k, int)
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None:
            _check_number("seed", self.seed, int)
            if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
                raise RequestError(f"seed must fit in 64 bits, got {self.seed}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids):
            raise RequestError("stop token ids must be integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _check_number(name: str, value, kind: type) -> None:
    """Finite, and an int where an int is meant (bools are not numbers here)."""
    ok = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, ok):
        raise RequestError(f"{name} must be a number, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise RequestError(f"{name} must be finite, got {value}")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.is_greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> list[int | Exception]:
    """One token per row of `logits` [B, V]; a row whose sampling fails (NaN probabilities
    from the model, say) gets its exception instead, and the other rows are unaffected."""
    logits = logits.float().cpu()
    if all(p.is_greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    out: list[int | Exception] = []
    for row, p, gen in zip(logits, params, gens, strict=True):
        try:
            out.append(int(row.argmax()) if p.is_greedy else _sample_row(row, p, gen))
        except (RuntimeError, ValueError) as e:  # torch reports bad probabilities this way
            out.append(e)
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop = probs.cumsum(-1) - probs > p.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
