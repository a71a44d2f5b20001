"""The engine: prompts in, completions out. Owns the model runner, KV cache, scheduler and
tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from xllm_compile.errors import ConfigError, RequestError, XllmError
from xllm_compile.runtime.kv_cache import KVCache
from xllm_compile.runtime.model_runner import ModelRunner
from xllm_compile.runtime.sampler import (
    SamplingParams,
    TokenLogprob,
    make_generator,
    sample,
    token_logprobs,
)
from xllm_compile.runtime.scheduler import Scheduler
from xllm_compile.runtime.sequence import Sequence, Status
from xllm_compile.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (eos or stop token), "length", or "error" (see `error`)
    error: str | None = None  # why the sequence failed, for finish_reason "error"


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        kv_cache: KVCache,
        tokenizer: Tokenizer | None,
        eos_token_ids: tuple[int, ...],
        max_num_seqs: int,
        max_num_tokens: int,
        manifest: dict,
        max_num_batched_tokens: int | None = None,
        prefix_caching: bool = False,
    ) -> None:
        """`max_num_tokens`: the artifact's most tokens in one step; `max_num_batched_tokens`:
        the scheduler's per-step budget (at most that; default: that), over which prompts are
        prefilled in chunks; `prefix_caching`: share KV pages of common prefixes (a paged
        cache only: runtime/prefix_cache.py)."""
        from xllm_compile.runtime.paged_kv_cache import PagedKVCache
        from xllm_compile.runtime.prefix_cache import PrefixCache

        self.runner = runner
        self.kv_cache = kv_cache
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = kv_cache.max_len
        self.max_num_tokens = max_num_tokens
        budget = max_num_batched_tokens or max_num_tokens
        if not 1 <= budget <= max_num_tokens:
            raise ConfigError(
                f"max_num_batched_tokens must be in [1, {max_num_tokens}] (the artifact's "
                f"--max-num-tokens), got {budget}"
            )
        self.max_num_batched_tokens = budget
        if prefix_caching and not isinstance(kv_cache, PagedKVCache):
            raise ConfigError("prefix caching shares KV pages: it needs the paged KV cache")
        self.prefix_cache = PrefixCache(kv_cache) if prefix_caching else None
        self.scheduler = Scheduler(kv_cache, max_num_seqs, budget, self.prefix_cache)
        self.manifest = manifest
        # sampling values a request leaves out (generation_config.json's; runtime/loader.py)
        self.sampling_defaults: dict = {}

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this artifact has no tokenizer; pass token ids instead of text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone UTF-16 surrogate ("\ud800") from JSON
                raise RequestError(
                    f"the prompt is not valid Unicode ({e.reason} at character {e.start})"
                ) from None
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty")
        limit = self.max_model_len - 1  # longer than a step's budget: prefilled in chunks
        if len(ids) > limit:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this artifact takes at most {limit} "
                "(recompile with a larger --max-model-len)"
            )
        vocab = self.manifest["model"]["config"]["vocab_size"]
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"token ids must be in [0, {vocab})")
        return ids

    def generate(
        self, prompts: list[str | list[int]], max_tokens: int = 16, **sampling
    ) -> list[Completion]:
        """Generate for every prompt together (one ragged batch per step); keeps prompt order."""
        # every prompt is checked before any is scheduled: a bad one leaves nothing behind
        seqs = [self.new_sequence(p, max_tokens, **sampling) for p in prompts]
        for seq in seqs:
            self.scheduler.add(seq)
        while self.scheduler.has_work():
            self.step()
        return [self._completion(seq) for seq in seqs]

    def stream(self, prompt: str | list[int], max_tokens: int = 256, **sampling) -> Iterator[str]:
        """Generate for one prompt, yielding text as it is decoded. A piece whose last bytes do
        not yet form a whole character (a multi-byte UTF-8 sequence split over tokens) is held
        back until they do, so no broken character is ever printed."""
        if self.tokenizer is None:
            raise RequestError("streaming text needs a tokenizer, and this artifact has none")
        seq = self.new_sequence(prompt, max_tokens, **sampling)
        self.scheduler.add(seq)
        printed = ""
        while not seq.is_finished:
            self.step()
            ids = [t for t in seq.output_ids if t not in self.eos_token_ids]
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd") and not seq.is_finished:
                continue
            if len(text) > len(printed) and text.startswith(printed):
                yield text[len(printed) :]
                printed = text
        if seq.finish_reason == "error":
            raise XllmError(f"generation failed: {seq.error}")

    @property
    def is_healthy(self) -> bool:
        """False once a tensor-parallel rank died or hung: no step can run any more."""
        return self.runner.is_healthy

    def close(self) -> None:
        """Release what outlives the process's objects: the other ranks of a --tp artifact."""
        self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def graph_cache_stats(self):
        """The graph cache's counters (hits, misses, builds, build time, evictions, compile-cache
        hits and misses, arena programs), or None without a graph cache."""
        return self.runner.stats if self.runner.bucketed else None

    def warmup(self, show_progress: bool = False) -> None:
        """Build every graph-cache bucket now (decode, and prefill where enabled), so that no
        request pays for a build; a no-op without a graph cache."""
        self.runner.warmup(self.kv_cache.tensor, show_progress=show_progress)

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch.seqs:  # every running sequence was preempted: nothing to run this step
            sched = self.scheduler
            if not sched.running and sched.waiting:  # and the next one cannot be admitted alone
                seq = sched.waiting.popleft()
                seq.error = "the KV cache cannot hold this sequence; raise --kv-memory"
                seq.status, seq.finish_reason = Status.FINISHED, "error"
                log.warning("sequence %d failed: %s", seq.seq_id, seq.error)
            return
        # echo's prompt logprobs need every prompt token's logits: that step returns all rows
        every = any(
            s.params.prompt_logprobs is not None and s.num_cached < len(s.prompt_ids)
            for s in batch.seqs
        )
        before = {s.seq_id: (s.num_cached, s.num_step) for s in batch.seqs} if every else {}
        seqs, logits = self._forward(batch.seqs, every)
        if not seqs:
            return
        self.scheduler.stepped(seqs)
        if every:
            logits = self._prompt_logprobs(seqs, logits, before)
        # a sequence whose prompt is not all computed yet (a chunk of it ran) samples nothing
        ready = [i for i, s in enumerate(seqs) if s.num_cached == s.num_tokens]
        if len(ready) < len(seqs):
            seqs = [seqs[i] for i in ready]
            logits = logits[ready]
        if not seqs:
            return
        tokens = sample(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [(s.prompt_ids, s.output_ids) for s in seqs],
        )
        self._logprobs(seqs, logits, tokens)
        for seq, token in zip(seqs, tokens, strict=True):
            if isinstance(token, Exception):
                self._fail(seq, f"sampling failed: {type(token).__name__}: {token}")
                continue
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)

    @staticmethod
    def _logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: list) -> None:
        """Each sampled token's logprob (and top ones) for the sequences that asked."""
        rows = [
            i
            for i, (s, t) in enumerate(zip(seqs, tokens, strict=True))
            if s.params.logprobs is not None and not isinstance(t, Exception)
        ]
        if not rows:
            return
        top = max(seqs[i].params.logprobs for i in rows)
        found = token_logprobs(logits[rows], [tokens[i] for i in rows], top)
        for i, lp in zip(rows, found, strict=True):
            k = seqs[i].params.logprobs
            seqs[i].logprobs.append(TokenLogprob(lp.token, lp.logprob, lp.top[:k]))

    @staticmethod
    def _prompt_logprobs(seqs: list[Sequence], logits: torch.Tensor, before: dict) -> torch.Tensor:
        """From a step's every-token logits: the prompt logprobs of the sequences that asked
        (token p's from the row of token p - 1), and the rows of each sequence's last token."""
        ends, start = [], 0
        for seq in seqs:
            first, n = before[seq.seq_id]
            top = seq.params.prompt_logprobs
            if top is not None:
                if first == 0:
                    seq.prompt_logprobs = [None]
                targets = [p for p in range(first + 1, first + n + 1) if p < len(seq.prompt_ids)]
                if targets:
                    rows = logits[start : start + len(targets)]
                    ids = [seq.prompt_ids[p] for p in targets]
                    seq.prompt_logprobs += token_logprobs(rows, ids, top)
            start += n
            ends.append(start - 1)
        return logits[ends]

    def _forward(
        self, seqs: list[Sequence], all_logits: bool = False
    ) -> tuple[list[Sequence], torch.Tensor | None]:
        """Logits for `seqs` (their last tokens', or every token's). When the batch fails, each
        sequence runs alone (a failed step marks nothing cached, and rewriting a KV row writes
        the same values), so only the ones that fail alone fail, with their error; the rest go
        on with their own logits."""
        try:
            return seqs, self.run_step(seqs, all_logits)
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs[0], f"the step failed: {type(e).__name__}: {e}")
                return [], None
            log.warning("a batch of %d failed (%s); running each alone", len(seqs), e)
        ok, rows = [], []
        for seq in seqs:
            try:
                rows.append(self.run_step([seq], all_logits))
                ok.append(seq)
            except Exception as e:  # this sequence is the cause (or one of them)
                self._fail(seq, f"the step failed: {type(e).__name__}: {e}")
        return ok, torch.cat(rows) if rows else None

    def run_step(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor:
        """Run one step of `seqs` on the runner and mark their pending tokens cached (the
        scheduler's bookkeeping: a step that raises marks nothing). Returns logits [N, V]."""
        logits = self.runner.run(seqs, self.kv_cache.tensor, all_logits)
        for seq in seqs:
            seq.num_cached += seq.num_step
            seq.num_scheduled = None
        return logits

    def _fail(self, seq: Sequence, message: str) -> None:
        log.warning("sequence %d failed: %s", seq.seq_id, message)
        seq.error = message
        self.scheduler.finish(seq, "error")

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _completion(self, seq: Sequence) -> Completion:
        ids = seq.output_ids
        if seq.finish_reason == "stop" and ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]  # the eos token ends the text; it is not part of it
        text = self.tokenizer.decode(ids) if self.tokenizer else None
        return Completion(seq.prompt_ids, ids, text, seq.finish_reason or "length", seq.error)

    # Request-level verbs: the server's engine loop (runtime/async_engine.py) drives the engine
    # through these, one request at a time, between steps.

    def new_sequence(
        self,
        prompt: str | list[int],
        max_tokens: int = 16,
        *,
        strict_length: bool = False,
        **sampling,
    ) -> Sequence:
        """A checked sequence for `prompt`, not yet scheduled. Reads no scheduler state, so a
        server may call it from another thread than the one stepping the engine.

        Raises:
            RequestError: bad sampling parameters, or a prompt that is empty, too long for the
                artifact, out of the vocabulary, or text without a tokenizer; with
                `strict_length`, a prompt plus max_tokens past the artifact's length (as OpenAI
                and vLLM refuse it).
        """
        params = SamplingParams(max_tokens=max_tokens, **{**self.sampling_defaults, **sampling})
        ids = self.encode(prompt)
        if strict_length and len(ids) + max_tokens > self.max_model_len:
            # (otherwise generation stops at the artifact's length, finish_reason "length")
            raise RequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, and the "
                f"request asks for {len(ids) + max_tokens} ({len(ids)} in the prompt, "
                f"{max_tokens} to generate): shorten the prompt or lower max_tokens"
            )
        return Sequence(ids, params, make_generator(params))

    def add_request(self, prompt: str | list[int], max_tokens: int = 16, **sampling) -> Sequence:
        """Queue one prompt; it joins the batch at the next `step()`. Raises as `new_sequence`."""
        seq = self.new_sequence(prompt, max_tokens, **sampling)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop `seq` now (finish_reason "abort"), freeing its KV slot and pages; a no-op for a
        finished sequence. Call between steps, from the thread that steps the engine."""
        if seq.status == Status.RUNNING:
            self.scheduler.finish(seq, "abort")
        elif seq.status == Status.WAITING:
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            seq.status, seq.finish_reason = Status.FINISHED, "abort"

    def completion(self, seq: Sequence) -> Completion:
        """`seq`'s result so far: its tokens (less a final eos) and their text."""
        return self._completion(seq)
