"""Test helpers: run prompts through the compiled program and through transformers."""

from __future__ import annotations

import contextlib
import subprocess
import sys

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
        rows = [engine.run_step([seq], all_logits=True)]
        for token in continuation:
            seq.output_ids.append(token)
            rows.append(engine.run_step([seq]))
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


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name with its labels: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m xllm_compile ARGS` in a real process."""
    return subprocess.run(
        [sys.executable, "-m", "xllm_compile", *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: exit 2, one line on stderr holding every needle, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@contextlib.contextmanager
def running_server(engine, model_name: str = "tiny"):
    """A real HTTPServer over `engine` on a free loopback port, in a thread; stopped after."""
    import threading
    import time

    from xllm_compile.runtime.server import HTTPServer, ServerConfig

    srv = HTTPServer(engine, ServerConfig(port=0, model_name=model_name))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield srv
    finally:
        srv.stop()
        thread.join(timeout=30)
    assert not thread.is_alive() and not srv.engine.is_alive
