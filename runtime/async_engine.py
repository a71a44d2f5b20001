"""The server's engine loop: one background thread steps the Engine while there is work. Requests
reach it through a thread-safe queue and join the running batch at the next step (continuous
batching); each gets its output back incrementally on its own asyncio queue. Incremental
detokenization and stop strings live here, since they cut and abort sequences mid-flight.

Threads: the asyncio loop (HTTP handlers) checks requests and builds their sequences
(`Engine.new_sequence` reads no scheduler state); only the engine thread touches the scheduler,
the KV cache and the sequences' token lists afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from xllm_compile.errors import RequestError
from xllm_compile.runtime.engine import Engine
from xllm_compile.runtime.histogram import ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS, Histogram
from xllm_compile.runtime.sequence import Sequence

log = logging.getLogger(__name__)

# Stop strings are checked every step against the new tail of each request's text; these caps
# bound that work per request (OpenAI takes 4 strings; vLLM no limit).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512
CUT_MESSAGE = "the server is shutting down: generation ended after the grace period"


@dataclass
class RequestOutput:
    """One increment of a request's output; the last one has `finish_reason` set."""

    text: str  # text decoded since the previous increment
    token_ids: list[int]  # tokens generated since the previous increment
    finish_reason: str | None = None  # "stop" (eos, stop token or stop string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, this increment included
    logprobs: list | None = None  # sampler.TokenLogprob of each of `token_ids`, if asked for
    prompt_logprobs: list | None = None  # in the first increment, if asked for (echo)
    prompt_ids: list[int] | None = None  # in the first increment


class EngineLoopError(RuntimeError):
    """The engine failed while stepping a batch; every request in flight gets this."""


class ShuttingDownError(EngineLoopError):
    """The server is shutting down: new requests are refused (503); open ones are ended with
    this after the grace period."""


class RequestFailedError(EngineLoopError):
    """One request failed while its batch was stepped (the engine traced the failure to it);
    only that request gets this, the others go on."""


@dataclass
class EngineMetrics:
    """Counters for /metrics. Each field has one writer, so no lock: the engine thread, except
    `requests_total`, `requests_rejected` and `requests_queued`, which the asyncio side writes."""

    requests_total: int = 0
    requests_rejected: int = 0
    requests_queued: int = 0  # handed to the engine thread (the asyncio side writes this)
    requests_admitted: int = 0  # taken in by the engine thread (which writes this)
    requests_finished: Counter = field(default_factory=Counter)  # finish_reason -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    step_errors: int = 0
    # per-request latencies (seconds), vLLM's histograms: arrival -> first token, between
    # tokens, arrival -> finish, arrival -> first scheduled
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))


class _Detokenizer:
    """Incremental decoding over a window of the output (vLLM's prefix/read offsets): decode
    ids[prefix:] and ids[prefix:read] and keep what the new tokens add. Both strings start at the
    same token, so a decoder that strips a leading space does so in both; a piece ending in an
    incomplete UTF-8 character (U+FFFD) waits for the tokens that complete it."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.prefix = self.read = 0

    def delta(self, ids: list[int]) -> str:
        before = self.decode(ids[self.prefix : self.read])
        after = self.decode(ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(ids)
        return after[len(before) :]


class _Request:
    """Engine-thread state of one request: what has been decoded and what was sent."""

    def __init__(self, seq: Sequence, stop: tuple[str, ...], emit: Callable[[object], None]):
        self.seq, self.stop, self.emit = seq, stop, emit
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.sent_chars = self.sent_ids = 0
        self.finish_reason: str | None = None
        self.detok: _Detokenizer | None = None
        self.sent_first = False  # an output went out (the first carries the prompt's ids)
        self.arrival = time.monotonic()
        self.scheduled: float | None = None  # when the step that first ran it began
        self.last_token: float | None = None  # when its last tokens were seen


class AsyncEngine:
    """Runs `engine` in a background thread for many concurrent asyncio callers.

    `submit()` checks a request and returns its sequence (raising RequestError at once, before
    a response has started); `stream()` queues it and yields its `RequestOutput`s.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = EngineMetrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: list[_Request] = []
        self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)
        self._stopped = False
        self._closing = False  # begin_shutdown() was called: admit nothing new
        self._deadline: float | None = None  # the engine thread's view of the grace period

    # -- the asyncio side --

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Abort every request in flight and stop the engine thread."""
        if self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join()

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop admitting (submit raises ShuttingDownError); requests in flight run on for up
        to `grace_s` seconds, then each ends with a final ShuttingDownError saying why."""
        self._closing = True
        self._inbox.put(("close", time.monotonic() + grace_s))

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_pending(self) -> int:
        """Requests queued for the engine thread but not yet in the scheduler."""
        return self.metrics.requests_queued - self.metrics.requests_admitted

    def submit(self, prompt: str | list[int], stop: tuple[str, ...] = (), **sampling) -> Sequence:
        """Check a request and build its sequence; nothing is scheduled until `stream()`.

        Raises:
            RequestError: bad parameters, a bad prompt, or stop strings without a tokenizer.
            EngineLoopError: the engine thread is not running.
        """
        if self._closing:
            raise ShuttingDownError("the server is shutting down; send the request elsewhere")
        if not self.is_alive:
            raise EngineLoopError("the engine loop is not running")
        if stop and self.engine.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this artifact has none")
        if any(not s for s in stop):
            raise RequestError("stop strings must not be empty")
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        if max(map(len, stop), default=0) > MAX_STOP_CHARS:
            raise RequestError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return self.engine.new_sequence(prompt, **sampling)

    async def stream(
        self, seq: Sequence, stop: tuple[str, ...] = ()
    ) -> AsyncIterator[RequestOutput]:
        """Schedule `seq` and yield its output as it is generated. Leaving early (the client
        went away, the task was cancelled) aborts the sequence and frees its KV."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        req = _Request(seq, stop, emit)
        self.metrics.requests_queued += 1
        self._inbox.put(("add", req))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self._inbox.put(("abort", req))

    # -- the engine thread --

    def _run(self) -> None:
        scheduler = self.engine.scheduler
        while not self._stopped:
            try:
                # block only while idle: with work in flight, new requests join between steps
                self._drain(block=not scheduler.has_work())
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._fail_all(ShuttingDownError(CUT_MESSAGE))
                if self._stopped or not scheduler.has_work():
                    continue
                started = time.monotonic()
                self.engine.step()
                self.metrics.steps += 1
                for req in list(self._active):
                    self._timings(req, started)
                    self._update(req)
            except Exception as e:  # a bug or a device failure: fail the batch, keep serving
                log.exception("the engine loop failed; failing %d requests", len(self._active))
                self.metrics.step_errors += 1
                self._fail_all(EngineLoopError(f"the engine failed: {type(e).__name__}: {e}"))
        self._fail_all(EngineLoopError("the server is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            command = self._inbox.get(block=block)
            while True:
                self._handle(*command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, verb: str, req) -> None:
        if verb == "stop":
            self._stopped = True
        elif verb == "close":
            self._deadline = req  # the grace period's end (a monotonic time)
        elif verb == "add":
            self.engine.scheduler.add(req.seq)
            self._active.append(req)
            self.metrics.requests_admitted += 1
            self.metrics.prompt_tokens += len(req.seq.prompt_ids)
        elif verb == "abort" and req in self._active:
            self.engine.abort(req.seq)
            self._retire(req, "abort")

    def _timings(self, req: _Request, step_started: float) -> None:
        """Observe `req`'s queue time, first token and inter-token gaps after a step."""
        seq, m = req.seq, self.metrics
        if req.scheduled is None and (seq.num_cached or seq.output_ids or seq.is_finished):
            req.scheduled = step_started
            m.queue.observe(step_started - req.arrival)
        new = len(seq.output_ids) - req.sent_ids
        if new <= 0:
            return
        now = time.monotonic()
        if req.last_token is None:
            m.ttft.observe(now - req.arrival)
        else:
            gap = (now - req.last_token) / new
            for _ in range(new):
                m.itl.observe(gap)
        req.last_token = now

    def _update(self, req: _Request) -> None:
        """Send what `req` gained in the last step; cut and abort it at a stop string."""
        seq, tokenizer = req.seq, self.engine.tokenizer
        if not seq.is_finished and len(seq.output_ids) == req.sent_ids:
            return  # still waiting, or preempted: nothing new
        if seq.finish_reason == "error":
            self._retire(req, "error")
            req.emit(RequestFailedError(f"this request failed: {seq.error}"))
            return
        searched = max(0, len(req.text) - max((len(s) for s in req.stop), default=0) + 1)
        if seq.is_finished:
            done = self.engine.completion(seq)
            ids, req.text = done.token_ids, done.text or ""
            reason = done.finish_reason
        else:
            ids, reason = seq.output_ids, None
            if tokenizer is not None:
                req.detok = req.detok or _Detokenizer(tokenizer.decode)
                req.text += req.detok.delta(ids)
        cut = _find_stop(req.text, req.stop, searched)
        if cut is not None:
            req.text, reason = req.text[:cut], "stop"
            self.engine.abort(seq)
        # hold back a tail that may yet become a stop string; it is sent if it does not
        end = len(req.text) if reason else len(req.text) - _stop_prefix_len(req.text, req.stop)
        first = not req.sent_first
        out = RequestOutput(
            req.text[req.sent_chars : end],
            ids[req.sent_ids :],
            reason,
            len(seq.prompt_ids),
            len(ids),
            seq.logprobs[req.sent_ids : len(ids)] if seq.params.logprobs is not None else None,
            seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None,
            seq.prompt_ids if first else None,
        )
        self.metrics.generation_tokens += len(out.token_ids)
        req.sent_chars, req.sent_ids = max(req.sent_chars, end), len(ids)
        if reason:  # counted before the caller hears of it, so /metrics is never behind
            self._retire(req, reason)
        if out.text or out.token_ids or reason:
            req.sent_first = True
            req.emit(out)

    def _retire(self, req: _Request, reason: str) -> None:
        self._active.remove(req)
        self.metrics.requests_finished[reason] += 1
        if reason not in ("abort", "error"):
            self.metrics.e2e.observe(time.monotonic() - req.arrival)

    def _fail_all(self, error: Exception) -> None:
        for req in list(self._active):
            try:
                self.engine.abort(req.seq)
            except Exception:  # the scheduler may be the broken part; the request fails anyway
                log.exception("could not abort sequence %d", req.seq.seq_id)
            self._retire(req, "error")
            req.emit(error)


def _find_stop(text: str, stop: tuple[str, ...], start: int) -> int | None:
    """Where the first stop string in `text` begins (searching from `start`), or None."""
    hits = [i for s in stop if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """The longest tail of `text` that begins some stop string (0 if none). Looks at the last
    len(s) - 1 characters only, jumping between occurrences of s's first character (C-level
    find/startswith), so a step costs O(sum of stop lengths), not O(len(text)^2)."""
    best = 0
    for s in stop:
        tail = text[-(len(s) - 1) :] if len(s) > 1 else ""
        i = tail.find(s[0]) if tail else -1
        while i >= 0 and len(tail) - i > best:
            if s.startswith(tail[i:]):
                best = len(tail) - i
                break
            i = tail.find(s[0], i + 1)
    return best
