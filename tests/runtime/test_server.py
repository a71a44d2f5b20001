"""`xllm serve`: the OpenAI-compatible HTTP server over the engine loop, on the embedded tiny
Llama. A real uvicorn server on a free loopback port, a real HTTP client (httpx), no mocks; every
answer is checked against `Engine.generate` on a second engine loaded from the same artifact."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from xllm_compile.runtime import load

from helpers import parse_metrics, running_server

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"
PROMPT = "It is a truth universally acknowledged"
PROMPTS = [
    "It is",
    "She was",
    "Mr. Darcy said that",
    "The family of Dashwood had long been settled in Sussex.",
    "Emma Woodhouse, handsome, clever, and rich,",
    "I",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Elizabeth",
]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact


@pytest.fixture(scope="module")
def ref(artifact):
    """A second engine on the same artifact: what each request gives alone, in-process."""
    return load(artifact)


@pytest.fixture(scope="module")
def server(artifact):
    with running_server(load(artifact)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def post_stream(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The server-sent events of one streamed request, [DONE] checked and dropped."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def metrics(client: httpx.Client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def wait_for(client: httpx.Client, done, what: str) -> dict[str, float]:
    """Poll /metrics until `done(metrics)` holds (the engine thread runs on its own)."""
    deadline = time.monotonic() + 60
    while not done(m := metrics(client)):
        assert time.monotonic() < deadline, f"gave up waiting for {what}: {m}"
        time.sleep(0.02)
    return m


def idle(m: dict[str, float]) -> bool:
    """No request in flight and every KV slot back in the cache."""
    return (
        m["xllm_requests_running"] == 0
        and m["xllm_requests_waiting"] == 0
        and m["xllm_kv_slots_free"] == m["xllm_kv_slots"]
    )


def test_greedy_completion_equals_engine_generate(client, ref):
    [want] = ref.generate([PROMPT], max_tokens=24)
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    [choice] = body["choices"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert choice["token_ids"] == want.token_ids
    assert choice["text"] == want.text
    assert choice["finish_reason"] == want.finish_reason == "length"
    assert body["usage"] == {
        "prompt_tokens": len(want.prompt_ids),
        "completion_tokens": 24,
        "total_tokens": len(want.prompt_ids) + 24,
    }


def test_logits_processor_fields(client, ref):
    # a +100 bias makes token 42 every greedy choice; penalties as engine.generate applies them
    body = {"prompt": PROMPT, "max_tokens": 6, "logit_bias": {"42": 100}, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == [42] * 6
    fields = dict(repetition_penalty=1.5, presence_penalty=0.8, frequency_penalty=0.4)
    [want] = ref.generate([PROMPT], max_tokens=16, temperature=0.0, **fields)
    [plain] = ref.generate([PROMPT], max_tokens=16, temperature=0.0)
    assert want.token_ids != plain.token_ids  # the penalties change the greedy text
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, **GREEDY, **fields}
    )
    assert r.json()["choices"][0]["token_ids"] == want.token_ids
    r = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "min_p": 0.2, "seed": 3},
    )
    again = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "min_p": 0.2, "seed": 3},
    )
    assert r.json()["choices"][0]["token_ids"] == again.json()["choices"][0]["token_ids"]


def test_token_id_prompt(client, ref):
    ids = ref.tokenizer.encode(PROMPT)
    [want] = ref.generate([ids], max_tokens=10)
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 10, **GREEDY})
    assert r.json()["choices"][0]["token_ids"] == want.token_ids
    r = client.post("/v1/completions", json={"prompt": [ids], "max_tokens": 10, **GREEDY})
    assert r.json()["choices"][0]["token_ids"] == want.token_ids  # a batch of one


def test_seeded_sampling_is_reproducible(client, ref):
    sampling = dict(temperature=0.9, top_p=0.9, top_k=40, seed=7)
    [want] = ref.generate([PROMPT], max_tokens=16, **sampling)
    body = {"prompt": PROMPT, "max_tokens": 16, **sampling}
    got = [client.post("/v1/completions", json=body).json()["choices"][0] for _ in range(2)]
    assert got[0]["token_ids"] == got[1]["token_ids"] == want.token_ids


def test_concurrent_requests_share_batches_and_equal_solo_results(client, ref, server):
    lengths = [5, 40, 12, 33, 20, 8, 27, 16]
    solo = [
        ref.generate([p], max_tokens=n, ignore_eos=True)[0]
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    steps_before = metrics(client)["xllm_engine_steps_total"]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            bodies = [
                {"prompt": p, "max_tokens": n, "ignore_eos": True, **GREEDY}
                for p, n in zip(PROMPTS, lengths, strict=True)
            ]
            rs = await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0] for r in rs]

    got = asyncio.run(run())
    assert [c["token_ids"] for c in got] == [s.token_ids for s in solo]
    assert [c["text"] for c in got] == [s.text for s in solo]
    # one step per token if each ran alone; fewer when they share batches
    steps = metrics(client)["xllm_engine_steps_total"] - steps_before
    assert steps < sum(lengths)
    assert idle(metrics(client))


def test_request_arriving_mid_generation_joins_the_batch(server, ref):
    """A short request sent while a long one streams finishes first: it joined the running batch
    at the next step instead of waiting for the long one to end."""
    [short_want] = ref.generate(["She was"], max_tokens=4, ignore_eos=True)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            started, long_done, tokens = asyncio.Event(), asyncio.Event(), []

            async def long():
                body = {"prompt": "I", "max_tokens": 480, "ignore_eos": True, "stream": True}
                async with ac.stream("POST", "/v1/completions", json={**body, **GREEDY}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            tokens.extend(json.loads(line[6:])["choices"][0]["token_ids"])
                            started.set()
                long_done.set()

            task = asyncio.create_task(long())
            await started.wait()
            body = {"prompt": "She was", "max_tokens": 4, "ignore_eos": True, **GREEDY}
            short = (await ac.post("/v1/completions", json=body)).json()["choices"][0]
            long_was_done = long_done.is_set()
            await task
            return short, long_was_done, tokens

    short, long_was_done, tokens = asyncio.run(run())
    assert short["token_ids"] == short_want.token_ids
    assert not long_was_done
    assert len(tokens) == 480


def test_a_list_of_prompts_is_one_choice_each(client, ref):
    prompts = PROMPTS[:4]
    want = [ref.generate([p], max_tokens=10, ignore_eos=True)[0] for p in prompts]
    body = {"prompt": prompts, "max_tokens": 10, "ignore_eos": True, **GREEDY}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["token_ids"] for c in out["choices"]] == [w.token_ids for w in want]
    assert out["usage"]["completion_tokens"] == 40
    assert out["usage"]["prompt_tokens"] == sum(len(w.prompt_ids) for w in want)
    ids = [ref.tokenizer.encode(p) for p in prompts[:2]]  # token-id prompts too
    r = client.post("/v1/completions", json={**body, "prompt": ids})
    assert [c["token_ids"] for c in r.json()["choices"]] == [w.token_ids for w in want[:2]]
    # streamed: each index's chunks concatenate to its prompt's text
    chunks = post_stream(
        client, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    *pieces, usage = chunks
    texts = ["", "", "", ""]
    for chunk in pieces:
        [choice] = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [w.text for w in want]
    assert usage["usage"]["completion_tokens"] == 40
    assert idle(wait_for(client, idle, "the sequences to finish"))


def test_streamed_chunks_concatenate_to_the_whole_text(client):
    body = {"prompt": PROMPT, "max_tokens": 30, "ignore_eos": True, **GREEDY}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = post_stream(
        client, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    *pieces, usage = chunks
    assert len(pieces) > 5
    assert "".join(c["choices"][0]["text"] for c in pieces) == whole["text"]
    assert [t for c in pieces for t in c["choices"][0]["token_ids"]] == whole["token_ids"]
    assert [c["choices"][0]["finish_reason"] for c in pieces][-2:] == [None, "length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 30
    assert len({c["id"] for c in chunks}) == 1


def test_stop_string_cuts_the_text_and_frees_the_sequence(client, ref):
    [full] = ref.generate([PROMPT], max_tokens=40, ignore_eos=True)
    words = full.text.split()
    stop = " " + words[len(words) // 2]  # a word from the middle of the greedy answer
    cut = full.text.index(stop)
    body = {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "stop": [stop], **GREEDY}
    got = client.post("/v1/completions", json=body).json()
    [choice] = got["choices"]
    assert choice["text"] == full.text[:cut]
    assert choice["finish_reason"] == "stop"
    assert got["usage"]["completion_tokens"] < 40  # aborted, not run to max_tokens
    pieces = post_stream(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in pieces) == full.text[:cut]
    assert pieces[-1]["choices"][0]["finish_reason"] == "stop"
    assert idle(wait_for(client, idle, "the stopped sequences to be freed"))


def test_stop_token_id_ends_generation(client, ref):
    [full] = ref.generate([PROMPT], max_tokens=20, ignore_eos=True)
    token = full.token_ids[6]
    [want] = ref.generate([PROMPT], max_tokens=20, ignore_eos=True, stop_token_ids=(token,))
    body = {"prompt": PROMPT, "max_tokens": 20, "ignore_eos": True, "stop": [token], **GREEDY}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert (
        choice["token_ids"] == want.token_ids == full.token_ids[: full.token_ids.index(token) + 1]
    )
    assert choice["finish_reason"] == "stop"


def test_chat_completion_uses_the_chat_template(client, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    prompt = ref.tokenizer.apply_chat_template(messages)
    assert "<|im_start|>assistant" in prompt
    [want] = ref.generate([prompt], max_tokens=16)
    body = {"model": "tiny", "messages": messages, "max_tokens": 16, **GREEDY}
    got = client.post("/v1/chat/completions", json=body).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert got["choices"][0]["finish_reason"] == want.finish_reason
    assert got["usage"]["prompt_tokens"] == len(want.prompt_ids)
    chunks = post_stream(client, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    # content given as a list of text parts is the same message
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
        }
    ]
    body = {"messages": [messages[0], *parts], "max_tokens": 16, **GREEDY}
    got = client.post("/v1/chat/completions", json=body).json()
    assert got["choices"][0]["message"]["content"] == want.text


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == "tiny" and card["object"] == "model"


LONG = [5] * 600
BAD_INPUT = [
    # (path, body: dict or raw bytes, status, words the one-line message contains)
    ("/v1/completions", b'{"prompt": "x", ', 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 422, "JSON object"),
    ("/v1/completions", {}, 422, "missing field 'prompt'"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"prompt": [1, "a"]}, 422, "'prompt': expected a string or a list"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 422, "stream"),
    ("/v1/completions", {"prompt": LONG}, 400, "600 tokens"),
    ("/v1/completions", {"prompt": [5, 2048]}, 400, "token ids must be in [0, 2048)"),
    ("/v1/completions", {"prompt": [-1]}, 400, "token ids must be in"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop strings"),
    ("/v1/completions", {"prompt": "x", "n": 65}, 400, "n must be in [1, 64]"),
    ("/v1/completions", {"prompt": ["x", "y"], "n": 40}, 400, "at most 64 completions"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs must be in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs as an integer"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3},
        400,
        "logprobs as a boolean",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
        400,
        "top_logprobs needs logprobs",
    ),
    ("/v1/completions", {"prompt": [5] * 10, "max_tokens": 503}, 400, "513 (10 in the prompt"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 600},
        400,
        "maximum context length is 512 tokens",
    ),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias keys"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"2048": 1}}, 400, "outside the vocab"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 300}}, 400, "[-100, 100]"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400, "min_p must be in [0, 1]"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": ["x"] * 65}, 400, "at most 64 prompts"),
    ("/v1/completions", {"prompt": ["x", ""]}, 400, "empty"),
    ("/v1/chat/completions", {"max_tokens": 3}, 422, "missing field 'messages'"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 422, "content"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages must not be empty"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 422, "messages.0.role"),
    ("/v1/nothing-here", {}, 404, "Not Found"),
]


def assert_error(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code"}
    assert "\n" not in error["message"] and error["message"], error
    assert needle in error["message"], error
    assert error["type"] == "invalid_request_error"


def send(client, path: str, body):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD_INPUT)
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(client, path, body, status, needle):
    assert_error(send(client, path, body), status, needle)
    assert client.get("/health").status_code == 200
    body = {"prompt": "She was", "max_tokens": 3, **GREEDY}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["finish_reason"]


def test_bad_requests_among_good_concurrent_ones(server, ref):
    good = [(p, 12) for p in PROMPTS[:4]]
    solo = [ref.generate([p], max_tokens=n, ignore_eos=True)[0].token_ids for p, n in good]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            jobs = []
            for (prompt, n), (path, bad, _, _) in zip(good, BAD_INPUT[::6][:4], strict=True):
                body = {"prompt": prompt, "max_tokens": n, "ignore_eos": True, **GREEDY}
                jobs += [ac.post("/v1/completions", json=body), send(ac, path, bad)]
                jobs.append(ac.post("/v1/completions", json={**body, "stream": True, "n": 65}))
            return await asyncio.gather(*jobs)

    responses = asyncio.run(run())
    oks, bads = responses[0::3], [r for i, r in enumerate(responses) if i % 3]
    assert [r.json()["choices"][0]["token_ids"] for r in oks] == solo
    assert all(400 <= r.status_code < 500 and "error" in r.json() for r in bads)


def test_metrics_counters_move(client):
    before = metrics(client)
    body = {"prompt": [5, 6, 7], "max_tokens": 9, "ignore_eos": True, **GREEDY}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    after = wait_for(client, idle, "the request to finish")
    assert after["xllm_requests_total"] == before["xllm_requests_total"] + 1
    assert after["xllm_requests_rejected_total"] == before["xllm_requests_rejected_total"] + 1
    assert after["xllm_prompt_tokens_total"] == before["xllm_prompt_tokens_total"] + 3
    assert after["xllm_generation_tokens_total"] == before["xllm_generation_tokens_total"] + 9
    length = 'xllm_requests_finished_total{finish_reason="length"}'
    assert after[length] == before.get(length, 0) + 1
    # every page back in the pool, or held by the prefix store until memory is needed
    assert after["xllm_kv_pages_free"] + after["xllm_kv_pages_retained"] == after["xllm_kv_pages"]


def test_client_disconnect_mid_stream_aborts_the_sequence(client):
    aborted = 'xllm_requests_finished_total{finish_reason="abort"}'
    before = metrics(client).get(aborted, 0)
    body = {"prompt": "I", "max_tokens": 500, "ignore_eos": True, "stream": True, **GREEDY}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    after = wait_for(client, lambda m: m.get(aborted, 0) > before, "the abort")
    assert after[aborted] == before + 1
    assert idle(wait_for(client, idle, "the aborted sequence's KV to be freed"))


def test_client_hanging_up_on_a_plain_request_aborts_it(client, server):
    """Not streamed: nothing is sent until the end, so the server watches for the hang-up."""
    aborted = 'xllm_requests_finished_total{finish_reason="abort"}'
    before = metrics(client)
    body = json.dumps({"prompt": "I", "max_tokens": 500, "ignore_eos": True, **GREEDY}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        # hang up once the sequence is generating
        wait_for(
            client,
            lambda m: m["xllm_generation_tokens_total"] > before["xllm_generation_tokens_total"],
            "the request to start",
        )
    after = wait_for(client, lambda m: m.get(aborted, 0) > before.get(aborted, 0), "the abort")
    assert after[aborted] == before.get(aborted, 0) + 1
    assert idle(wait_for(client, idle, "the aborted sequence's KV to be freed"))


def test_engine_abort_frees_kv(ref):
    """The engine verb behind stop strings and disconnects: running and waiting sequences."""
    free = ref.kv_cache.num_free_slots
    running = ref.add_request("It is", max_tokens=50)
    ref.step()  # prefill: `running` holds a KV slot now
    waiting = ref.add_request("She was", max_tokens=50)
    assert ref.kv_cache.num_free_slots == free - 1
    ref.abort(running)
    ref.abort(waiting)
    ref.abort(running)  # a no-op once finished
    assert (running.finish_reason, waiting.finish_reason) == ("abort", "abort")
    assert ref.kv_cache.num_free_slots == free and not ref.scheduler.has_work()


# -- the `xllm serve` process --


def serve_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xllm_compile", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_one_line_error(proc: subprocess.Popen, *needles: str) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_serve_missing_artifact_is_one_line_exit_2(tmp_path):
    assert_one_line_error(serve_cli(str(tmp_path / "nope")), "nope")


def test_serve_on_a_busy_port_is_one_line_exit_2(artifact):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert_one_line_error(
            serve_cli(str(artifact), "--port", str(port)), "cannot listen", str(port)
        )


def test_serve_prints_its_url_answers_and_stops_cleanly_on_ctrl_c(artifact):
    args = ("--port", "0", "--model-name", "austen", "--graph-cache", "eager", "--warmup")
    args += ("--arena",)  # every bucket over the activation arena
    proc = serve_cli(str(artifact), *args)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with httpx.Client(base_url=url.removesuffix("/v1"), timeout=120) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "austen"
            body = {"model": "austen", "prompt": "It is", "max_tokens": 4}
            r = c.post("/v1/completions", json=body)
            assert len(r.json()["choices"][0]["token_ids"]) == 4
            m = metrics(c)
            assert m["xllm_graph_cache_builds_total"] > 0  # --warmup built the buckets
            assert m["xllm_graph_cache_hits_total"] >= 3  # the decode steps ran through them
            assert m["xllm_graph_cache_entries"] == m["xllm_graph_cache_builds_total"]
            assert m["xllm_graph_cache_arena_bytes"] > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and not out.strip()


def test_access_log_has_one_line_per_request(client, ref, caplog):
    caplog.set_level(logging.INFO, logger="xllm.access")
    body = {"prompt": "She was", "max_tokens": 3, "ignore_eos": True, **GREEDY}
    client.post("/v1/completions", json=body)
    post_stream(client, "/v1/completions", body)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **GREEDY}
    post_stream(client, "/v1/chat/completions", chat)
    client.post("/v1/completions", json={**body, "max_tokens": 0})
    client.get("/health")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "xllm.access"]

    deadline = time.monotonic() + 30  # a stream's line comes as its response ends
    while len(lines()) < 5:
        assert time.monotonic() < deadline, lines()
        time.sleep(0.02)
    plain, streamed, chat_line, bad, health = lines()[:5]
    prompt = len(ref.tokenizer.encode("She was"))
    for line in (plain, streamed):
        assert line.startswith("POST /v1/completions 200 ")
        assert f"prompt={prompt} completion=3 " in line and line.endswith("s")
    assert chat_line.startswith("POST /v1/chat/completions 200 prompt=")
    assert "completion=2 " in chat_line
    assert bad.startswith("POST /v1/completions 400 ")
    assert bad.endswith(": max_tokens must be at least 1, got 0")
    assert health.startswith("GET /health 200 ")
