"""One request can never fail or stall another: sampling parameters are checked at the door, a
failure while stepping a batch fails only the sequence that caused it, stop strings and bodies
are bounded, slow clients time out, and SIGTERM ends every open stream with a final event.
A real uvicorn server on loopback and a real client; reference tokens from a second engine."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from xllm_compile.runtime import load
from xllm_compile.runtime.async_engine import MAX_STOP_STRINGS, _stop_prefix_len
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.server import HTTPServer, ServerConfig

PROMPTS = ["It is", "She was", "Mr. Darcy said", "Emma", "I", "Elizabeth", "The", "Her"]
LIMITS = dict(max_body_bytes=64 << 10, body_timeout_s=0.5, header_timeout_s=0.5)


@pytest.fixture(scope="module")
def ref(tiny_artifact):
    return load(tiny_artifact)


@pytest.fixture(scope="module")
def server(tiny_artifact):
    srv = HTTPServer(load(tiny_artifact), ServerConfig(port=0, **LIMITS))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield srv
    srv.stop()
    thread.join(30)


def solo(ref, prompt: str, n: int) -> list[int]:
    return ref.generate([prompt], max_tokens=n, ignore_eos=True)[0].token_ids


def post_all(server, bodies: list) -> list[httpx.Response]:
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            headers = {"content-type": "application/json"}
            posts = [
                ac.post("/v1/completions", content=json.dumps(b), headers=headers) for b in bodies
            ]
            return await asyncio.gather(*posts)  # json.dumps: NaN as JavaScript writes it

    return asyncio.run(run())


@pytest.mark.parametrize("bad", [float("nan"), 1e-40])
def test_one_bad_temperature_among_8_streams(server, ref, bad):
    """NaN is a 400; 1e-40 samples greedily; the other 7 get the tokens they get alone."""
    bodies = [
        {"prompt": p, "max_tokens": 10, "ignore_eos": True, "temperature": 0} for p in PROMPTS
    ]
    bodies[3] = {**bodies[3], "temperature": bad}
    rs = post_all(server, bodies)
    for i, (r, p) in enumerate(zip(rs, PROMPTS, strict=True)):
        if i == 3 and bad != bad:  # NaN
            assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
            continue
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == solo(ref, p, 10)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("seed", 1 << 64, "64 bits"),
        ("seed", -(1 << 70), "64 bits"),
        ("top_p", float("inf"), "top_p"),
        ("temperature", float("inf"), "temperature"),
        ("stop", ["x"] * (MAX_STOP_STRINGS + 1), "stop strings"),
        ("stop", ["y" * 10_000], "at most"),
        ("prompt", "bad \ud800 surrogate", "not valid Unicode"),
    ],
)
def test_bad_values_are_a_400(server, field, value, needle):
    body = json.dumps({"prompt": "It is", "max_tokens": 2, field: value})  # NaN/Infinity allowed
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert needle in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


def test_a_sequence_failing_in_a_step_fails_alone(ref):
    """Second line of defence, when something slips past the checks: a sampling failure (NaN
    temperature forced past validation) and a forward failure (a token id beyond the vocab
    appended to the batch) each fail their own sequence; the others keep their tokens."""
    engine = ref
    want = {p: solo(engine, p, 8) for p in PROMPTS[:4]}
    seqs = [engine.add_request(p, max_tokens=8, ignore_eos=True) for p in PROMPTS[:4]]
    broken = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    object.__setattr__(broken, "temperature", float("nan"))  # a bug that bypassed the check
    seqs[1].params = broken
    engine.step()  # prefill: the NaN row fails, the others sample greedily
    seqs[2].output_ids[-1] = 10**9  # the next forward's input: an embedding index error
    while engine.scheduler.has_work():
        engine.step()
    assert seqs[1].finish_reason == "error" and "sampling failed" in seqs[1].error
    assert seqs[2].finish_reason == "error" and "step failed" in seqs[2].error
    for i in (0, 3):
        assert seqs[i].output_ids == want[PROMPTS[i]]
    assert engine.kv_cache.num_free_slots == engine.kv_cache.num_slots  # nothing leaked


def test_stop_prefix_tail_matches_the_quadratic_reference():
    def reference(text, stop):
        best = 0
        for s in stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stop = tuple(
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 3))
        )
        assert _stop_prefix_len(text, stop) == reference(text, stop), (text, stop)


def test_body_over_the_cap_is_a_413(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * (100 << 10)})
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(100):
                yield b" " * 1024

        r = c.post("/v1/completions", content=chunks())
        assert r.status_code == 413
        assert c.get("/health").status_code == 200


def raw_connection(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def test_slow_body_is_a_408_and_slow_headers_are_cut(server):
    with raw_connection(server) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt"'
        )
        reply = s.recv(4096)  # the rest never comes
        assert reply.startswith(b"HTTP/1.1 408"), reply
    with raw_connection(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never end
        started = time.monotonic()
        assert s.recv(4096) == b""  # closed by the server
        assert time.monotonic() - started < 9  # before the client's own timeout
    with raw_connection(server) as s:  # a kept-alive connection: the next request's headers
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b'"ok"' not in reply:  # the whole response (it may come in several segments)
            reply += s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never end
        assert s.recv(4096) == b""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200


def test_sigterm_ends_open_streams_with_a_final_event(tiny_artifact):
    cmd = [sys.executable, "-m", "xllm_compile", "serve", str(tiny_artifact), "--port", "0"]
    cmd += ["--shutdown-grace", "0"]  # end it at once (the default 5 s would let it finish)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" at ")[1].split()[0].removesuffix("/v1")
        body = {"prompt": "It is", "max_tokens": 510, "ignore_eos": True, "stream": True}  # all 512
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                events = [next(lines) for _ in range(4)]  # it is streaming
                proc.send_signal(signal.SIGTERM)
                events += list(lines)
        data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]"
        final = json.loads(data[-2])
        assert "shutting down" in final["error"]["message"]
        proc.wait(timeout=30)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
