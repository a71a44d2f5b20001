"""Tensor parallelism on the CPU: TP=2 artifacts of every family (real gloo process groups, a
real worker process per extra rank) against TP=1, the CLI and the server over them, and the
faults: a bad --tp, a killed or hung worker, and no orphan process after rank 0 goes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from xllm_compile.artifact import MANIFEST
from xllm_compile.runtime import load
from xllm_compile.runtime.server import HTTPServer, ServerConfig

from conftest import FAMILIES, compile_cli
from helpers import assert_one_line_error, prefill_then_decode, rel_err, run_cli

PROMPTS = [[1, 17, 93, 250, 4, 61, 77, 300, 12, 45], [5, 6, 7], [300, 2, 9, 9, 31]]


# the communication passes: the default (schedule_collectives), chunked matmul + all-reduce
# scheduled, and chunked without the scheduler
VARIANTS = {
    "default": (),
    "chunked": ("--passes", "+chunk_allreduce"),
    "fused-norm": ("--passes", "+fuse_allreduce_norm"),
    "microbatch": ("--passes", "+microbatch_overlap"),
    "chunked-unscheduled": (
        "--passes",
        "+chunk_allreduce",
        "--disable-pass",
        "schedule_collectives",
    ),
}


@pytest.fixture(scope="module")
def tp_artifacts(family_models, tmp_path_factory):
    """(family, variant) -> (TP=1 artifact, TP=2 artifact)."""
    cache = {}

    def get(family: str, variant: str = "default"):
        if (family, variant) not in cache:
            _, model_dir, art1 = family_models(family)
            out = tmp_path_factory.mktemp(f"{family}-tp2-{variant}") / "art"
            art2 = compile_cli(model_dir, out, "--tp", "2", *VARIANTS[variant])
            cache[family, variant] = (art1, art2)
        return cache[family, variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_matches_tp1(family, variant, tp_artifacts):
    art1, art2 = tp_artifacts(family, variant)
    manifest = json.loads((art2 / MANIFEST).read_text())
    assert manifest["tp"]["size"] == 2 and len(manifest["tp"]["ranks"]) == 2
    log = {p["name"]: p for p in manifest["passes"]}
    row_parallel = 2 * 2  # o_proj and down_proj in each of the 2 layers
    if variant.startswith("chunked"):
        chunked = log["chunk_allreduce"]["stats"]
        assert chunked["matches"] == row_parallel and chunked["details"]["chunks"] == 2
    if variant == "fused-norm":  # every all-reduce feeding a residual add + norm
        biased = 2 if family == "llama_linear" else 0  # o_proj's bias sits between: left alone
        assert log["fuse_allreduce_norm"]["stats"]["matches"] == row_parallel - biased
    if variant == "chunked":  # every chunk's wait but the last moved past the next matmul
        assert log["schedule_collectives"]["stats"]["details"]["waits_moved"] == row_parallel
    assert ("schedule_collectives" in log) == (variant != "chunked-unscheduled")
    if variant == "microbatch":  # each layer's two all-reduces, in two halves
        assert log["microbatch_overlap"]["stats"]["matches"] == row_parallel
    # --overlap auto unless the pipeline names an overlap pass itself
    auto = variant in ("default", "fused-norm")
    assert ("overlap_choice" in log) == (manifest["overlap"] is not None) == auto
    one = load(art1)
    with load(art2) as two:
        want = one.generate(PROMPTS, max_tokens=32, ignore_eos=True)
        got = two.generate(PROMPTS, max_tokens=32, ignore_eos=True)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        ref = prefill_then_decode(one, PROMPTS[0], want[0].token_ids[:6])
        assert rel_err(prefill_then_decode(two, PROMPTS[0], want[0].token_ids[:6]), ref) < 1e-4
        procs = two.runner.tp_group.procs
    assert all(p.poll() is not None for p in procs)  # close() stopped the worker


LONG = 700  # tokens: past the microbatch/chunk minimum of 256 rows, so the halves are real


@pytest.fixture(scope="module")
def long_artifacts(family_models, tmp_path_factory):
    """llama3 at --max-model-len 1024: TP=1, and TP=2 with --overlap auto (the cost model's
    choice), the microbatch and the chunked program forced."""
    _, model_dir, _ = family_models("llama3")
    root = tmp_path_factory.mktemp("long")
    flags = {
        "auto": (),
        "microbatch": ("--passes", "+microbatch_overlap"),
        "chunked": ("--passes", "+chunk_allreduce"),
    }
    arts = {"tp1": compile_cli(model_dir, root / "tp1", "--max-model-len", "1024")}
    for name, extra in flags.items():
        arts[name] = compile_cli(
            model_dir, root / name, "--max-model-len", "1024", "--tp", "2", *extra
        )
    return arts


@pytest.mark.parametrize("variant", ["auto", "microbatch", "chunked"])
def test_long_prefill_with_overlap_matches_tp1(variant, long_artifacts):
    prompt = [(i * 37) % 317 + 3 for i in range(LONG)]
    one = load(long_artifacts["tp1"])
    [want] = one.generate([prompt], max_tokens=8, ignore_eos=True)
    ref = prefill_then_decode(one, prompt, want.token_ids[:4])
    with load(long_artifacts[variant]) as two:
        [got] = two.generate([prompt], max_tokens=8, ignore_eos=True)
        assert got.token_ids == want.token_ids
        assert rel_err(prefill_then_decode(two, prompt, want.token_ids[:4]), ref) < 1e-4
        programs = two.runner.programs
        if variant == "auto":  # the long prefill ran the program the table names for it
            assert programs.runs[programs.variant_for(LONG)] >= 2
            assert programs.runs["base"] >= 8  # the decode steps
        else:
            assert set(programs.runs) == {"base"}  # one program, every step


def test_overlap_choice_follows_the_predictions(long_artifacts):
    """The table is the cost model's argmin per size (beyond the margin); the artifact holds
    exactly the variants it names; inspect shows the choice and the predictions."""
    from xllm_compile import overlap

    manifest = json.loads((long_artifacts["auto"] / MANIFEST).read_text())
    o = manifest["overlap"]
    assert set(o["costs"]) == set(overlap.VARIANTS) and o["profile"]["world_size"] == 2
    assert o["select"] == overlap.table(o["sizes"], overlap.winners(o["costs"]))
    used = {v for _, v in o["select"]} - {"base"}
    assert set(o["variants"]) == used
    for v in used:
        for name in o["variants"][v]["ranks"]:
            assert (long_artifacts["auto"] / name).is_file() and name in manifest["files"]
    for costs in o["costs"].values():
        for c in costs:
            assert c["predicted_ms"] >= max(c["compute_ms"], c["comm_ms"]) * 0.999
    shown = run_cli("inspect", str(long_artifacts["auto"])).stdout
    assert "compute/communication overlap" in shown
    assert f"predicted ms @ {o['sizes'][-1]} tokens" in shown


def test_overlap_flags(family_models, tmp_path):
    """--comm-profile: a bad file is a one-line error before any work; a profile where every
    all-reduce costs a second makes base the best at every size (each variant adds collectives),
    so the artifact holds no variant. --overlap none: no choice at all."""
    _, model_dir, _ = family_models("llama3")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    args = ("compile", str(model_dir), "--out", str(tmp_path / "a"), "--tp", "2")
    assert_one_line_error(run_cli(*args, "--comm-profile", str(bad)), "not a communication profile")
    slow = tmp_path / "slow.json"
    points = [[256, 1.0], [1 << 24, 1.0]]
    slow.write_text(json.dumps({"backend": "gloo", "world_size": 2, "points": points}))
    art = compile_cli(model_dir, tmp_path / "slow", "--tp", "2", "--comm-profile", str(slow))
    o = json.loads((art / MANIFEST).read_text())["overlap"]
    assert o["select"] == [[None, "base"]] and o["variants"] == {}
    assert o["profile"]["source"] == str(slow)
    assert sorted(p.name for p in art.glob("program*.json")) == [
        "program.json",
        "program.rank1.json",
    ]
    art = compile_cli(model_dir, tmp_path / "none", "--tp", "2", "--overlap", "none")
    manifest = json.loads((art / MANIFEST).read_text())
    assert manifest["overlap"] is None
    assert "overlap_choice" not in {p["name"] for p in manifest["passes"]}


def test_bad_tp_is_one_line(family_models, tmp_path):
    _, model_dir, _ = family_models("llama3")
    proc = run_cli("compile", str(model_dir), "--out", str(tmp_path / "a"), "--tp", "3")
    assert_one_line_error(proc, "--tp 3", "num_attention_heads=4")


def test_cli_generate_and_inspect(tp_artifacts):
    art1, art2 = tp_artifacts("llama3")
    args = ("--token-ids", "1,17,93,250", "--max-tokens", "8")
    one, two = run_cli("generate", str(art1), *args), run_cli("generate", str(art2), *args)
    assert two.returncode == 0 and two.stdout == one.stdout, two.stderr
    shown = run_cli("inspect", str(art2)).stdout
    assert "2 rank(s)" in shown and "program.rank1.json" in shown


def test_a_killed_worker_fails_requests_clearly(tp_artifacts):
    _, art2 = tp_artifacts("llama3")
    with load(art2, tp_timeout_s=5) as engine:
        engine.runner.tp_group.procs[0].kill()
        engine.runner.tp_group.procs[0].wait()
        [done] = engine.generate([PROMPTS[0]], max_tokens=4)
        assert done.finish_reason == "error" and "rank 1 exited" in done.error
        assert not engine.is_healthy


def test_a_hung_worker_is_stopped_by_the_watchdog(tp_artifacts):
    _, art2 = tp_artifacts("llama3")
    with load(art2, tp_timeout_s=2) as engine:
        engine.generate([PROMPTS[1]], max_tokens=2)  # healthy first
        os.kill(engine.runner.tp_group.procs[0].pid, signal.SIGSTOP)
        [done] = engine.generate([PROMPTS[0]], max_tokens=4)
        assert done.finish_reason == "error" and "did not answer within 2 s" in done.error
        assert not engine.is_healthy


def test_no_orphan_after_rank_0_is_killed(tp_artifacts):
    _, art2 = tp_artifacts("llama3")
    script = (
        "import sys, time; from xllm_compile.runtime import load; e = load(sys.argv[1]); "
        "print(' '.join(str(p.pid) for p in e.runner.tp_group.procs), flush=True); "
        "time.sleep(600)"
    )
    rank0 = subprocess.Popen(
        [sys.executable, "-c", script, str(art2)], stdout=subprocess.PIPE, text=True
    )
    workers = [int(pid) for pid in rank0.stdout.readline().split()]
    assert workers
    rank0.kill()
    rank0.wait()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") and _not_zombie(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived rank 0"
        time.sleep(0.1)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_server_over_a_tp_artifact(tp_artifacts):
    art1, art2 = tp_artifacts("llama3")
    want = [c.token_ids for c in load(art1).generate(PROMPTS, max_tokens=12, ignore_eos=True)]
    srv = HTTPServer(load(art2), ServerConfig(port=0))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not srv.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                bodies = [
                    {"prompt": p, "max_tokens": 12, "ignore_eos": True, "temperature": 0}
                    for p in PROMPTS
                ]
                return await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))

        got = [r.json()["choices"][0]["token_ids"] for r in asyncio.run(run())]
        assert got == want
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/health").status_code == 200
            srv.engine.engine.runner.tp_group.procs[0].kill()
            srv.engine.engine.runner.tp_group.procs[0].wait()
            r = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2})
            assert r.status_code == 500 and "rank 1 exited" in r.json()["error"]["message"]
            assert c.get("/health").status_code == 503
    finally:
        srv.stop()
        thread.join(30)
        srv.engine.engine.close()


def torchrun(*args: str, **kw):
    from xllm_compile.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node"]
    cmd += ["2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return [*cmd, "-m", "xllm_compile.cli", *args]


def test_torchrun_generate_and_serve(tp_artifacts):
    """Every rank under torchrun runs the same command; rank 0 answers, the other serves steps."""
    art1, art2 = tp_artifacts("llama3")
    args = ("--token-ids", "1,17,93,250", "--max-tokens", "8")
    proc = subprocess.run(
        torchrun("generate", str(art2), *args), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == run_cli("generate", str(art1), *args).stdout
    serve = subprocess.Popen(
        torchrun("serve", str(art2), "--port", "0"), stdout=subprocess.PIPE, text=True
    )
    try:
        line = serve.stdout.readline()
        url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        want = load(art1).generate([PROMPTS[0]], max_tokens=6, ignore_eos=True)[0].token_ids
        body = {"prompt": PROMPTS[0], "max_tokens": 6, "ignore_eos": True, "temperature": 0}
        with httpx.Client(base_url=url, timeout=120) as c:
            got = c.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
        assert got == want
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()


def test_preemption_under_tp_keeps_every_rank_in_step(tp_artifacts):
    """An exhausted page pool preempts and recomputes on rank 0; the journal replays every
    allocate / grow / free on rank 1, so its pages follow and the tokens stay those alone."""
    import random

    art1, art2 = tp_artifacts("llama3")
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 320) for _ in range(rng.randint(30, 60))] for _ in range(8)]
    alone = [c.token_ids for c in load(art1).generate(prompts, max_tokens=24, ignore_eos=True)]
    page = 4096  # 2 layers x K,V x 1 KV head x 16 dims x 4 bytes = 256 B a token: 16 a page
    with load(art2, kv_memory=24 * page, kv_page_size=page) as engine:
        together = engine.generate(prompts, max_tokens=24, ignore_eos=True)
        assert [c.token_ids for c in together] == alone
        assert engine.scheduler.num_preemptions > 0  # the pool really ran out


def test_graph_cache_under_tp(tp_artifacts):
    """The eager graph cache pads each step to its bucket on rank 0 and every rank runs the
    same padded inputs on the same kv-length view of its cache."""
    art1, art2 = tp_artifacts("llama3")
    want = [c.token_ids for c in load(art1).generate(PROMPTS, max_tokens=16, ignore_eos=True)]
    with load(art2, graph_cache=True, warmup=True) as engine:
        got = engine.generate(PROMPTS, max_tokens=16, ignore_eos=True)
        assert [c.token_ids for c in got] == want
        stats = engine.graph_cache_stats
        assert stats.hits >= 15 and stats.builds > 0  # the decode steps ran bucketed
        assert stats.unbucketed >= 1  # the prefill (eager: no prefill buckets) ran unbucketed


def test_device_groups_pick_their_backend(monkeypatch):
    """CPU ranks use gloo; CUDA and Ascend ranks one group that sends CPU tensors (the step
    broadcast) over gloo and device tensors (the program's all-reduces) over NCCL / HCCL, each
    rank on the device of its local rank. (Only the CPU group runs here: no GPU.)"""
    from xllm_compile.errors import BackendUnavailableError
    from xllm_compile.runtime.tp_group import group_backend, rank_device

    assert group_backend("cpu") == "gloo"
    assert group_backend("cuda:0") == "cpu:gloo,cuda:nccl"
    assert rank_device("cpu", 1) == "cpu" and rank_device("cuda", 1) == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun: the local rank, not the global one
    assert rank_device("cuda", 7) == "cuda:3"
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # not installed
    with pytest.raises(BackendUnavailableError, match="needs torch_npu"):
        group_backend("npu")
