"""A sequence being generated: its tokens, sampling state and KV slot."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from xllm_compile.runtime.sampler import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    num_scheduled: int | None = None  # tokens the current step computes (None: all pending)
    block_hashes: list[int] = field(default_factory=list)  # prefix_cache.chain_hashes, cached
    finish_reason: str | None = None
    error: str | None = None  # set with finish_reason "error": why this sequence failed
    logprobs: list = field(default_factory=list)  # sampler.TokenLogprob per output token
    prompt_logprobs: list = field(default_factory=list)  # per prompt token (None for the first)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def pending_ids(self) -> list[int]:
        """Tokens not yet in the KV cache: the prompt at prefill, the last sampled token after."""
        return self.all_ids[self.num_cached :]

    def step_ids(self) -> list[int]:
        """The tokens this step computes: the scheduled chunk of the pending ones."""
        return self.all_ids[self.num_cached : self.num_cached + self.num_step]

    @property
    def num_step(self) -> int:
        """How many tokens this step computes (len(step_ids()), without building the list)."""
        n = self.num_pending
        return n if self.num_scheduled is None else min(self.num_scheduled, n)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_cached
