"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, per-request
seeds, and the logits processors OpenAI's and vLLM's APIs expose, applied in vLLM's order:

    logit_bias          logits[t] += bias[t]
    repetition_penalty  every token of the prompt and the output so far: logit / r if > 0, else
                        logit * r (transformers' RepetitionPenaltyLogitsProcessor; 1 = off)
    frequency_penalty   logits -= f * count(t in output)        (OpenAI; output tokens only)
    presence_penalty    logits -= p * (count(t in output) > 0)
    then temperature, top-k, top-p, min-p (drop tokens below min_p x the top probability,
    transformers' MinPLogitsWarper) and the draw. Greedy takes the argmax after the processors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xllm_compile.errors import RequestError

# Temperatures below this sample as greedy (vLLM's _SAMPLING_EPS): dividing logits by 1e-40
# overflows them to inf and the softmax to NaN.
MIN_TEMPERATURE = 1e-5
SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20  # top logprobs a token may ask for (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # each sampled token's logprob and this many top ones
    prompt_logprobs: int | None = None  # the same for every prompt token (completions' echo)

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
        for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), float)
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, int)
                if not 0 <= value <= MAX_LOGPROBS:
                    raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        for token, bias in self.logit_bias:
            _check_number("a logit_bias token id", token, int)
            _check_number("a logit_bias value", bias, float)
            if token < 0:
                raise RequestError(f"logit_bias token id {token} is negative")
            if not -100 <= bias <= 100:
                raise RequestError(f"logit_bias values must be in [-100, 100], got {bias}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_processors(self) -> bool:
        """Whether the logits change before the draw (greedy included)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.has_counts

    @property
    def has_counts(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


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
    logits: torch.Tensor,
    params: list[SamplingParams],
    gens: list[torch.Generator | None],
    history: list[tuple[list[int], list[int]]] | None = None,
) -> list[int | Exception]:
    """One token per row of `logits` [B, V]; `history`: each row's (prompt ids, output ids), for
    the penalties. A row whose sampling fails (NaN probabilities from the model, say) gets its
    exception instead, and the other rows are unaffected."""
    logits = logits.float().cpu()
    if all(p.is_greedy and not p.has_processors for p in params):
        return greedy(logits)
    out: list[int | Exception] = []
    for i, (row, p, gen) in enumerate(zip(logits, params, gens, strict=True)):
        try:
            if p.has_processors:
                prompt, output = history[i] if history is not None else ([], [])
                row = process(row, p, prompt, output)
            out.append(greedy(row[None])[0] if p.is_greedy else _sample_row(row, p, gen))
        except (RuntimeError, ValueError, IndexError) as e:  # bad probabilities, a bad bias id
            out.append(e)
    return out


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log_softmax of the program's logits, before
    any processor or temperature: vLLM's raw logprobs) and the `top` most likely tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """The logprob of `tokens[i]` under row i of `logits` [N, V], with each row's `top` best."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = lp.topk(top, dim=-1)
        tops = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, c, k) for t, c, k in zip(tokens, chosen, tops, strict=True)]


def greedy(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first of equal maxima, NaN counting as the largest, as torch's).
    numpy's: ATen's CPU argmax over a 49k vocabulary takes ~75 us a row, numpy's ~3 (SmolLM2,
    2 threads; 289 against 37 us for 8 rows), at batch 1 ~1.5% of a decode step."""
    return logits.numpy().argmax(axis=-1).tolist()


def process(
    logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """The logits processors (module doc) on one row [V], into a new tensor."""
    logits = logits.clone()
    vocab = logits.numel()
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias])
        if int(ids.max()) >= vocab:
            raise IndexError(f"logit_bias token id {int(ids.max())} is past the vocabulary")
        logits.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias]))
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        ids = torch.tensor(sorted(set(prompt_ids) | set(output_ids)))
        seen = logits[ids]
        r = p.repetition_penalty
        logits[ids] = torch.where(seen > 0, seen / r, seen * r)
    if p.has_counts and output_ids:
        counts = torch.bincount(torch.tensor(output_ids), minlength=vocab)[:vocab].float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row [V]: the logits the draw's softmax
    takes, -inf where a token is dropped."""
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
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    probs = warp(logits, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))
