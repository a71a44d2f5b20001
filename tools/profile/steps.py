"""Timing one engine's steps the way the runtime runs them (engine.run_step: the graph cache when
the engine has one), and the summary every `xllm profile` table prints: the median of repeated
runs with their spread."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence


@dataclass(frozen=True)
class Timing:
    """Milliseconds: the median of `runs` timings and their spread (half the interquartile
    range, so one stray run on a shared machine does not widen it)."""

    median_ms: float
    spread_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = sorted(1000 * s for s in seconds)
        if len(ms) < 4:
            spread = (ms[-1] - ms[0]) / 2
        else:
            q = statistics.quantiles(ms, n=4)
            spread = (q[2] - q[0]) / 2
        return cls(statistics.median(ms), spread, len(ms))

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ± {self.spread_ms:.3f}"


def _vocab(engine) -> int:
    return engine.manifest["model"]["config"]["vocab_size"]


def _sequences(engine, lengths: list[int], reserve: int, seed: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        seq = Sequence(
            torch.randint(3, _vocab(engine), (n,), generator=g).tolist(), SamplingParams()
        )
        seq.slot = engine.kv_cache.allocate(n + reserve)
        seqs.append(seq)
    return seqs


def _free(engine, seqs: list[Sequence]) -> None:
    for seq in seqs:
        engine.kv_cache.free(seq.slot)


@torch.inference_mode()
def decode_seconds(engine, batch: int, steps: int, prompt_len: int = 16, seed: int = 0) -> list:
    """Seconds of each of `steps` greedy decode steps of `batch` sequences (after a prefill of
    `prompt_len` tokens each, not timed)."""
    seqs = _sequences(engine, [prompt_len] * batch, steps + 1, seed)
    try:
        logits = engine.run_step(seqs)
        times = []
        for _ in range(steps):
            for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                seq.output_ids.append(token)
            start = time.perf_counter()
            logits = engine.run_step(seqs)
            times.append(time.perf_counter() - start)
        return times
    finally:
        _free(engine, seqs)


@torch.inference_mode()
def prefill_seconds(engine, tokens: int, repeats: int, seed: int = 0) -> list:
    """Seconds of `repeats` prefills of one sequence of `tokens` tokens (each into a fresh slot)."""
    times = []
    for i in range(repeats):
        seqs = _sequences(engine, [tokens], 1, seed + i)
        try:
            start = time.perf_counter()
            engine.run_step(seqs)
            times.append(time.perf_counter() - start)
        finally:
            _free(engine, seqs)
    return times


@torch.inference_mode()
def reference_logits(engine, prompt_len: int = 12, decode_steps: int = 3, seed: int = 0):
    """Logits of a fixed step sequence, for comparing programs: a prefill of one sequence (every
    token's logits), then `decode_steps` greedy decode steps. Returns [prompt_len + steps, V]."""
    [seq] = _sequences(engine, [prompt_len], decode_steps + 1, seed)
    try:
        rows = [engine.run_step([seq], all_logits=True).float().clone()]
        for _ in range(decode_steps):
            seq.output_ids.append(int(rows[-1][-1].argmax()))
            rows.append(engine.run_step([seq]).float().clone())
        return torch.cat(rows)
    finally:
        _free(engine, [seq])
