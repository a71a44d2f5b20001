"""`xllm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine loop.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent events
ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Bad input is an OpenAI-style error body, never a dead server: malformed JSON 400, wrong or
missing fields 422, a bad value or prompt (RequestError) 400, an unknown model 404.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from xllm_compile.errors import ConfigError, RequestError, XllmError
from xllm_compile.runtime.async_engine import (
    AsyncEngine,
    EngineLoopError,
    RequestOutput,
    ShuttingDownError,
)
from xllm_compile.runtime.engine import Engine
from xllm_compile.runtime.histogram import Histogram
from xllm_compile.runtime.http_limits import BodyLimits, header_timeout_protocol


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the bound one is in `HTTPServer.url`)
    model_name: str | None = None  # the id clients send as "model"; default: the artifact's folder
    graceful_shutdown_s: float = 5.0  # after SIGTERM / Ctrl-C: open streams may run this long
    max_body_bytes: int = 4 << 20  # a larger request body is a 413
    body_timeout_s: float = 30.0  # a body still arriving after this is a 408
    header_timeout_s: float = 10.0  # a connection without request headers by then is closed


MAX_PROMPTS = 64  # prompts in one completions request (each its own sequence in the batch)

# -- request bodies (strict: "3" is not an int; unknown OpenAI fields are accepted and ignored) --


class _Body(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str | None = None
    temperature: float | None = None  # OpenAI's default: 1
    top_p: float | None = None
    top_k: int | None = None  # an extension, as in vLLM
    seed: int | None = None
    stop: str | list[str | int] | None = None  # stop strings; ints are stop token ids
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None


class CompletionRequest(_SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(_SamplingBody):
    messages: list[ChatMessage]
    top_logprobs: int | None = None
    max_tokens: int | None = None  # default: until the artifact's max length
    max_completion_tokens: int | None = None


# One-line descriptions of union fields, whose raw pydantic errors name every member type.
_UNION_FIELDS = {
    "prompt": "a string or a list of token ids",
    "stop": "a string or a list of strings and token ids",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
    "logprobs": "a boolean or an integer",
}


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; ids are checked against the vocabulary
    (the values' range by SamplingParams)."""
    out = []
    for key, value in (bias or {}).items():
        if not key.strip().lstrip("-").isdigit():
            raise RequestError(f"logit_bias keys must be token ids, got {key!r}")
        token = int(key)
        if not 0 <= token < vocab_size:
            raise RequestError(
                f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})"
            )
        out.append((token, value))
    return tuple(out)


# -- errors --


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


ACCESS_LOG = logging.getLogger("xllm.access")


class AccessLog:
    """ASGI middleware: one line per HTTP request once its response is complete (a stream at its
    end): method, path, status, the request's token counts, seconds, and a 4xx/5xx's reason.

        POST /v1/completions 200 prompt=9 completion=24 0.412s
        POST /v1/completions 400 0.003s: max_tokens must be at least 1, got 0

    It reads the scope and the response messages only (it never touches `receive`, so a
    client hanging up is still seen by the handler)."""

    MAX_ERROR_BYTES = 4096

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, error = time.perf_counter(), 0, bytearray()

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                error.extend(message.get("body", b"")[: self.MAX_ERROR_BYTES - len(error)])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            ACCESS_LOG.info("%s", self._line(scope, status, time.perf_counter() - start, error))

    @staticmethod
    def _line(scope, status: int, seconds: float, error: bytes) -> str:
        usage = scope.get("state", {}).get("usage") or {}
        tokens = "".join(
            f" {k.split('_')[0]}={usage[k]}"
            for k in ("prompt_tokens", "completion_tokens")
            if k in usage
        )
        line = f"{scope['method']} {scope['path']} {status or '-'}{tokens} {seconds:.3f}s"
        if error:
            try:
                line += ": " + json.loads(error)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
        return line


def _error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    one_line = " ".join(message.split())
    body = {"error": {"message": one_line, "type": type_, "code": code}}
    return JSONResponse(body, status_code=status)


def _validation_message(err: dict) -> str:
    path = [str(p) for p in err["loc"] if p != "body"]
    fields = [p for p in path if p.isidentifier() and p not in ("str", "int", "bool", "float")]
    if not path:  # the body itself: a list, a string, or a form sent without a JSON type
        return "the body must be a JSON object (Content-Type: application/json)"
    if err["type"] == "missing":
        return f"missing field {'.'.join(path)!r}"
    name = next((p for p in reversed(fields) if p in _UNION_FIELDS), None)
    if name is not None:
        where = ".".join(path[: path.index(name) + 1])
        return f"{where!r}: expected {_UNION_FIELDS[name]}"
    where = ".".join(fields) or "body"
    return f"{where!r}: {err['msg']}"


# -- the app --


def create_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    """The FastAPI app over a started `engine`, answering as model `model_name`."""
    app = FastAPI(title="xllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessLog)
    created = int(time.time())
    metrics = engine.metrics
    vocab_size = engine.engine.manifest["model"]["config"]["vocab_size"]

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.requests_rejected += 1
        errors = exc.errors()
        bad_json = next((e for e in errors if e["type"] == "json_invalid"), None)
        if bad_json is not None:
            reason = bad_json.get("ctx", {}).get("error", "cannot be parsed")
            return _error(400, f"the body is not valid JSON: {reason}", "invalid_request_error")
        return _error(
            422, _validation_message(errors[0]), "invalid_request_error", errors[0]["type"]
        )

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        metrics.requests_rejected += 1
        return _error(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(XllmError)
    async def _xllm_error(_request: Request, exc: XllmError) -> JSONResponse:
        metrics.requests_rejected += 1
        return _error(400, str(exc), "invalid_request_error", type(exc).__name__)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", code)

    @app.exception_handler(EngineLoopError)
    async def _engine_error(_request: Request, exc: EngineLoopError) -> JSONResponse:
        status = 503 if isinstance(exc, ShuttingDownError) else 500
        return _error(status, str(exc), "server_error")

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        # our bug: an OpenAI-style 500 for the client; uvicorn logs the traceback
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def check(body: _SamplingBody) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {model_name!r}",
                "invalid_request_error",
                "model_not_found",
            )
        if not 1 <= body.n <= MAX_PROMPTS:
            raise RequestError(f"n must be in [1, {MAX_PROMPTS}], got {body.n}")

    def given(value, key: str, default):
        """The request's value, else the model's generation_config.json's, else `default`."""
        return value if value is not None else engine.engine.sampling_defaults.get(key, default)

    def sampling(body: _SamplingBody, max_tokens: int | None) -> tuple[dict, tuple[str, ...]]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_ids = [s for s in stop if isinstance(s, int)] + list(body.stop_token_ids or [])
        kwargs = dict(
            max_tokens=engine.engine.max_model_len if max_tokens is None else max_tokens,
            temperature=given(body.temperature, "temperature", 1.0),  # OpenAI's default: 1
            top_p=given(body.top_p, "top_p", 1.0),
            top_k=max(given(body.top_k, "top_k", 0), 0),  # -1: off (vLLM)
            seed=body.seed,
            stop_token_ids=tuple(stop_ids),
            ignore_eos=body.ignore_eos,
            min_p=given(body.min_p, "min_p", 0.0),
            repetition_penalty=given(body.repetition_penalty, "repetition_penalty", 1.0),
            presence_penalty=0.0 if body.presence_penalty is None else body.presence_penalty,
            frequency_penalty=0.0 if body.frequency_penalty is None else body.frequency_penalty,
            logit_bias=_logit_bias(body.logit_bias, vocab_size),
        )
        return kwargs, tuple(s for s in stop if isinstance(s, str))

    async def submit_all(prompts: list, n: int, stop: tuple[str, ...], kwargs: dict) -> list:
        """The sequences of every prompt, n each (choice index = prompt * n + j). With a seed,
        completion j of a prompt samples with seed + j: n distinct and reproducible choices.
        Every one is checked before any is scheduled: a bad one leaves nothing running."""
        if len(prompts) * n > MAX_PROMPTS:
            raise RequestError(
                f"at most {MAX_PROMPTS} completions in one request (prompts x n), "
                f"got {len(prompts) * n}"
            )
        seqs = []
        for p in prompts:
            # tokenizing a long prompt takes a while: off the event loop, which serves everyone
            first = await asyncio.to_thread(engine.submit, p, stop, **kwargs)
            seqs.append(first)
            for j in range(1, n):
                seed = None if kwargs["seed"] is None else (kwargs["seed"] + j) % (1 << 64)
                seqs.append(engine.submit(first.prompt_ids, stop, **{**kwargs, "seed": seed}))
        return seqs

    def token_text(token: int) -> str:
        tokenizer = engine.engine.tokenizer
        return f"token_id:{token}" if tokenizer is None else tokenizer.decode([token])

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_alive:
            return _error(503, "the engine loop has stopped", "server_error")
        if not engine.engine.is_healthy:  # a tensor-parallel rank died or hung
            return _error(503, "the tensor-parallel group is down; restart", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "xllm"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(
            render_metrics(engine, model_name),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        if isinstance(body.logprobs, bool):
            raise RequestError("completions take logprobs as an integer (top tokens per token)")
        prompts = body.prompt
        if not (prompts and isinstance(prompts[0], (str, list)) and not isinstance(prompts, str)):
            prompts = [prompts]  # one prompt: text or token ids
        if len(prompts) > MAX_PROMPTS:
            raise RequestError(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompts)}")
        kwargs, stop = sampling(body, body.max_tokens)
        kwargs["strict_length"] = "max_tokens" in body.model_fields_set
        kwargs["logprobs"] = body.logprobs
        if body.echo and body.logprobs is not None:
            kwargs["prompt_logprobs"] = body.logprobs
        seqs = await submit_all(prompts, body.n, stop, kwargs)
        metrics.requests_total += 1
        head = _Head(f"cmpl-{uuid.uuid4().hex}", "text_completion", model_name)
        streams = [engine.stream(seq, stop) for seq in seqs]
        request.state.usage = {}  # for the access log, filled as the request ends
        fmt = _CompletionLogprobs(token_text) if body.logprobs is not None else None
        echo = _Echo(engine.engine.tokenizer, body.echo)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _completion_chunks(
                _merged(streams), head, include_usage, request.state.usage, fmt, echo, body.n
            )
            return _sse(chunks)
        done = await _collect_all(streams, request)
        if done is None:
            return _client_gone()
        choices = []
        for i, out in enumerate(done):
            text, out = echo.apply(out)
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": fmt.render(out) if fmt else None,
                    "finish_reason": out.finish_reason,
                    "token_ids": out.token_ids,
                }
            )
        request.state.usage.update(_usage(*done, n=body.n))
        return {**head.fields(), "choices": choices, "usage": _usage(*done, n=body.n)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check(body)
        tokenizer = engine.engine.tokenizer
        if tokenizer is None:
            raise RequestError("chat needs a tokenizer, and this artifact has none")
        if not body.messages:
            raise RequestError("messages must not be empty")
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise RequestError("chat takes logprobs as a boolean (and top_logprobs: a count)")
        if body.top_logprobs is not None and not body.logprobs:
            raise RequestError("top_logprobs needs logprobs: true")
        messages = [{"role": m.role, "content": _content_text(m)} for m in body.messages]
        prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages)  # or a 400
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:  # the newer name wins
            max_tokens = body.max_completion_tokens
        kwargs, stop = sampling(body, max_tokens)
        kwargs["strict_length"] = max_tokens is not None  # default: up to the artifact's length
        if body.logprobs:
            kwargs["logprobs"] = body.top_logprobs or 0
        seqs = await submit_all([prompt], body.n, stop, kwargs)
        metrics.requests_total += 1
        head = _Head(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", model_name)
        request.state.usage = {}  # for the access log, filled as the request ends
        fmt = _ChatLogprobs(token_text) if body.logprobs else None
        streams = [engine.stream(seq, stop) for seq in seqs]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _chat_chunks(
                _merged(streams), len(seqs), head, include_usage, request.state.usage, fmt
            )
            return _sse(chunks)
        done = await _collect_all(streams, request)
        if done is None:
            return _client_gone()
        request.state.usage.update(_usage(*done, n=body.n))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": fmt.render(out) if fmt else None,
                "finish_reason": out.finish_reason,
            }
            for i, out in enumerate(done)
        ]
        return {**head.fields(), "choices": choices, "usage": _usage(*done, n=body.n)}

    return app


def _client_gone() -> JSONResponse:
    # nginx's 499: the client closed the connection; uvicorn drops the response unsent
    return _error(499, "the client closed the request", "invalid_request_error")


def _content_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


@dataclass
class _Head:
    """The fields every response and chunk of one request repeat."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def fields(self, object_: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": object_ or self.object,
            "created": self.created,
            "model": self.model,
        }


async def _collect_all(
    outputs: list[AsyncIterator[RequestOutput]], request: Request
) -> list[RequestOutput] | None:
    """The whole outputs of a non-streamed request's sequences, or None if the client hung up
    first: that cancels the collection, which aborts every sequence."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def gather() -> list[RequestOutput]:
        return list(await asyncio.gather(*(_whole(o) for o in outputs)))

    work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # closing the streams aborts the sequences
    return None if work.cancelled() else work.result()


async def _collect(outputs: AsyncIterator[RequestOutput], request: Request) -> RequestOutput | None:
    """The whole output of a non-streamed request, or None if the client hung up first: that
    cancels the collection, which aborts the sequence (else it would run on for nobody)."""
    done = await _collect_all([outputs], request)
    return None if done is None else done[0]


async def _whole(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    text, ids, logprobs, first, last = [], [], [], None, None
    async for out in outputs:
        text.append(out.text)
        ids.extend(out.token_ids)
        logprobs.extend(out.logprobs or [])
        first, last = first or out, out
    return RequestOutput(
        "".join(text),
        ids,
        last.finish_reason,
        last.prompt_tokens,
        len(ids),
        logprobs if first.logprobs is not None else None,
        first.prompt_logprobs,
        first.prompt_ids,
    )


class _Echo:
    """completions' echo: the prompt's text before the completion's (and its tokens' logprobs
    before the completion's, when logprobs were asked for)."""

    def __init__(self, tokenizer, on: bool) -> None:
        self.tokenizer, self.on = tokenizer, on

    def apply(self, out: RequestOutput) -> tuple[str, RequestOutput]:
        """The text to send for `out`, and `out` with the prompt's logprobs in front of its
        own when it is the first increment of an echoed request."""
        if not self.on or out.prompt_ids is None:
            return out.text, out
        prompt = self.tokenizer.decode(out.prompt_ids) if self.tokenizer else ""
        if out.logprobs is not None and out.prompt_logprobs is not None:
            out = dataclasses.replace(out, logprobs=[*out.prompt_logprobs, *out.logprobs])
        return prompt + out.text, out


class _CompletionLogprobs:
    """The completions API's logprobs object: tokens, token_logprobs, top_logprobs,
    text_offset (the echoed prompt's first token has none: null)."""

    def __init__(self, token_text) -> None:
        self.token_text = token_text
        self.offset = {}  # choice index -> characters so far (text_offset across chunks)

    def render(self, out: RequestOutput, index: int = 0) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        at = self.offset.get(index, 0)
        for i, lp in enumerate(out.logprobs or []):
            if lp is None:  # the prompt's first token: nothing before it to predict it
                tokens.append(self.token_text(out.prompt_ids[0]) if out.prompt_ids else "")
                lps.append(None)
                tops.append(None)
            else:
                tokens.append(self.token_text(lp.token))
                lps.append(lp.logprob)
                tops.append({self.token_text(t): v for t, v in lp.top})
            offsets.append(at)
            at += len(tokens[i])
        self.offset[index] = at
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


class _ChatLogprobs:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def __init__(self, token_text) -> None:
        self.token_text = token_text

    def _one(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def render(self, out: RequestOutput, index: int = 0) -> dict:
        content = [
            {
                **self._one(lp.token, lp.logprob),
                "top_logprobs": [self._one(t, v) for t, v in lp.top],
            }
            for lp in out.logprobs or []
        ]
        return {"content": content}


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple]:
    """(index, output) of several streams as each comes; leaving early (the client went away)
    closes every stream, which aborts its sequence."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # an engine error ends the whole response
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    open_ = len(tasks)
    try:
        while open_:
            i, item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except EngineLoopError as e:  # the status line is sent already: report in the stream
            error = {"message": str(e), "type": "server_error", "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _completion_chunks(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    head: _Head,
    include_usage: bool,
    usage: dict,
    fmt: _CompletionLogprobs | None = None,
    echo: _Echo | None = None,
    n: int = 1,
) -> AsyncIterator[dict]:
    """The chunks of a streamed completion; `usage` gets the token counts at the end."""
    last: dict[int, RequestOutput] = {}
    async for i, out in outputs:
        text, out = echo.apply(out) if echo else (out.text, out)
        choice = {
            "index": i,
            "text": text,
            "logprobs": fmt.render(out, i) if fmt else None,
            "finish_reason": out.finish_reason,
            "token_ids": out.token_ids,
        }
        yield {**head.fields(), "choices": [choice]}
        last[i] = out
    totals = _usage(*(last[i] for i in sorted(last)), n=n) if last else {}
    usage.update(totals)
    if include_usage and last:
        yield {**head.fields(), "choices": [], "usage": totals}


async def _chat_chunks(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    n: int,
    head: _Head,
    include_usage: bool,
    usage: dict,
    fmt: _ChatLogprobs | None = None,
) -> AsyncIterator[dict]:
    """The chunks of a streamed chat completion (n choices, each opened by a role delta);
    `usage` gets the token counts at the end."""
    kind = "chat.completion.chunk"
    for i in range(n):
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield {**head.fields(kind), "choices": [first]}
    last: dict[int, RequestOutput] = {}
    async for i, out in outputs:
        delta = {"content": out.text} if out.text else {}
        choice = {
            "index": i,
            "delta": delta,
            "logprobs": fmt.render(out) if fmt else None,
            "finish_reason": out.finish_reason,
        }
        yield {**head.fields(kind), "choices": [choice]}
        last[i] = out
    totals = _usage(*(last[i] for i in sorted(last)), n=n) if last else {}
    usage.update(totals)
    if include_usage and last:
        yield {**head.fields(kind), "choices": [], "usage": totals}


def _usage(*outs: RequestOutput, n: int = 1) -> dict:
    """Token counts over a request's sequences in choice order (n per prompt, which counts
    once)."""
    prompt = sum(o.prompt_tokens for o in outs[::n])
    completion = sum(o.completion_tokens for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# -- metrics --


def render_metrics(engine: AsyncEngine, model_name: str = "default") -> str:
    """Prometheus text format (version 0.0.4) of the engine's counters, gauges and histograms:
    ours as xllm_*, and the latency histograms and prefix-cache counters under vLLM's names
    (vllm:*, labelled model_name) so its dashboards work."""
    m, eng = engine.metrics, engine.engine
    lines: list[str] = []

    def add(name: str, kind: str, help_: str, samples: dict[str, float] | float) -> None:
        samples = samples if isinstance(samples, dict) else {"": samples}
        lines.extend([f"# HELP xllm_{name} {help_}", f"# TYPE xllm_{name} {kind}"])
        lines.extend(f"xllm_{name}{labels} {_number(v)}" for labels, v in samples.items())

    add("requests_total", "counter", "Requests accepted.", m.requests_total)
    add("requests_rejected_total", "counter", "Requests refused (4xx).", m.requests_rejected)
    finished = {f'{{finish_reason="{r}"}}': n for r, n in sorted(m.requests_finished.items())}
    add("requests_finished_total", "counter", "Requests finished (abort: client left).", finished)
    add("requests_running", "gauge", "Sequences in the running batch.", len(eng.scheduler.running))
    waiting = len(eng.scheduler.waiting) + engine.num_pending
    add("requests_waiting", "gauge", "Requests waiting to be admitted.", waiting)
    add("prompt_tokens_total", "counter", "Prompt tokens admitted.", m.prompt_tokens)
    add("generation_tokens_total", "counter", "Tokens generated.", m.generation_tokens)
    add("engine_steps_total", "counter", "Engine steps run.", m.steps)
    add("engine_step_errors_total", "counter", "Engine steps that failed.", m.step_errors)
    preempted = eng.scheduler.num_preemptions
    add("preemptions_total", "counter", "Sequences preempted for KV memory.", preempted)
    kv = eng.kv_cache
    add("kv_slots", "gauge", "KV cache slots.", kv.num_slots)
    add("kv_slots_free", "gauge", "KV cache slots free.", kv.num_free_slots)
    pool = getattr(kv, "pool", None)  # the paged cache's physical pages
    if pool is not None:
        add("kv_pages", "gauge", "Physical KV pages in the pool.", pool.num_pages)
        add("kv_pages_free", "gauge", "Physical KV pages free.", pool.num_free)
        held = pool.stats().retained
        add("kv_pages_retained", "gauge", "KV pages held by the prefix store.", held)
        add("kv_page_bytes", "gauge", "Bytes per KV page.", pool.page_size)
    prefix = eng.prefix_cache
    if prefix is not None:
        p = prefix.stats
        add(
            "prefix_cache_requests_hit_total",
            "counter",
            "Requests reusing a prefix.",
            p.requests_hit,
        )
        add("prefix_cache_pages_shared_total", "counter", "KV pages aliased.", p.pages_shared)
        add("prefix_cache_pages_copied_total", "counter", "Partial pages copied.", p.pages_copied)
        add("prefix_cache_deferred_total", "counter", "Admissions deferred.", p.deferred)
        add("prefix_cache_evictions_total", "counter", "Stored prefixes evicted.", p.evictions)
        add("prefix_cache_stored", "gauge", "Finished sequences' prefixes kept.", p.stored)
    cache = eng.runner
    if cache.bucketed:
        s = cache.stats
        add("graph_cache_hits_total", "counter", "Steps run by a cached graph.", s.hits)
        add("graph_cache_misses_total", "counter", "Steps that found no graph.", s.misses)
        add("graph_cache_builds_total", "counter", "Graphs built.", s.builds)
        add("graph_cache_build_seconds_total", "counter", "Time building graphs.", s.build_time_s)
        add("graph_cache_evictions_total", "counter", "Graphs evicted.", s.evictions)
        add("graph_cache_entries", "gauge", "Graphs held.", len(cache.entries))
        add("graph_cache_bytes", "gauge", "Memory held by the graphs.", cache.nbytes)
        add("graph_cache_arena_bytes", "gauge", "Activation arena mapped.", cache.arena_bytes)
        add("graph_cache_unbucketed_total", "counter", "Steps no bucket held.", s.unbucketed)
    label = f'model_name="{_label(model_name)}"'

    def vllm(name: str, kind: str, help_: str, value) -> None:
        lines.extend([f"# HELP vllm:{name} {help_}", f"# TYPE vllm:{name} {kind}"])
        if isinstance(value, Histogram):
            lines.extend(value.lines(f"vllm:{name}", label))
        else:
            lines.append(f"vllm:{name}{{{label}}} {_number(value)}")

    vllm("time_to_first_token_seconds", "histogram", "Time to first token.", m.ttft)
    vllm("inter_token_latency_seconds", "histogram", "Time between tokens.", m.itl)
    vllm("e2e_request_latency_seconds", "histogram", "Arrival to finish.", m.e2e)
    vllm("request_queue_time_seconds", "histogram", "Arrival to first scheduled.", m.queue)
    if prefix is not None:
        queries, hits = prefix.stats.queries, prefix.stats.hits
        vllm("prefix_cache_queries_total", "counter", "Prompt tokens looked up.", queries)
        vllm("prefix_cache_hits_total", "counter", "Prompt tokens reused.", hits)
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


# -- the server --


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, telling the engine loop when a signal starts the shutdown."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


class HTTPServer:
    """The engine loop, the app and uvicorn on one bound socket. `run()` blocks until Ctrl-C or
    SIGTERM (or `stop()` from another thread) and then stops the engine loop.

    Raises:
        ConfigError: the address cannot be bound (port in use, unknown host).
    """

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = AsyncEngine(engine)
        self.model_name = config.model_name or "default"
        self.app = create_app(self.engine, self.model_name)
        self.socket = _bind(config.host, config.port)
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self._grace_s = config.graceful_shutdown_s
        app = BodyLimits(self.app, config.max_body_bytes, config.body_timeout_s)
        self._server = _UvicornServer(
            uvicorn.Config(
                app,
                http=header_timeout_protocol(config.header_timeout_s),
                log_config=None,  # keep the process's logging setup (the CLI's one-line format)
                log_level="warning",
                access_log=False,
                lifespan="off",
                # our grace period ends every stream with a final event; then uvicorn closes
                timeout_graceful_shutdown=config.graceful_shutdown_s + 5,
            ),
            on_exit=lambda: self.engine.begin_shutdown(self._grace_s),
        )

    @property
    def started(self) -> bool:
        return self._server.started

    def run(self) -> None:
        self.engine.start()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.engine.shutdown()
            self.socket.close()

    def stop(self) -> None:
        """Shut down as on SIGTERM: admit nothing new, give open requests the grace period."""
        self.engine.begin_shutdown(self._grace_s)
        self._server.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def model_name_for(artifact: str | Path) -> str:
    return Path(artifact).resolve().name
