"""The graph cache: bucket math, padding that never changes a real token, zero builds after
warm-up over 1,000 random decode and prefill steps, LRU eviction, compile-time buckets."""

from __future__ import annotations

import json
import random
import re

import torch

from xllm_compile.buckets import (
    bucket_for,
    decode_batch_buckets,
    kv_len_buckets,
    prefill_token_buckets,
)
from xllm_compile.runtime import load
from xllm_compile.runtime.model_runner import attach_graph_cache


def test_buckets():
    assert decode_batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert decode_batch_buckets(6) == (1, 2, 4, 6)
    assert kv_len_buckets(300) == (64, 128, 256, 300)
    assert bucket_for(5, (1, 2, 4, 8)) == 8
    assert bucket_for(8, (1, 2, 4, 8)) == 8
    assert bucket_for(9, (1, 2, 4, 8)) is None
    assert prefill_token_buckets(2048) == (16, 32, 64, 128, 256, 512)  # capped: compute-bound
    assert prefill_token_buckets(100) == (16, 32, 64, 100)
    from xllm_compile.buckets import parse_buckets

    assert parse_buckets(None, 8, 256, 2048)["prefill_tokens"] == [16, 32, 64, 128, 256, 512]
    assert parse_buckets("prefill=", 8, 256, 2048)["prefill_tokens"] == []  # none: unbucketed
    assert parse_buckets("prefill=64,4096", 8, 256, 2048)["prefill_tokens"] == [64]


def test_prefill_keys(llama_artifact):
    engine = load(llama_artifact, max_num_seqs=8)
    cache = attach_graph_cache(engine, prefill=True)
    assert cache.prefill_buckets == prefill_token_buckets(engine.max_num_tokens)
    # (T, B, longest) -> ("prefill", Tp, Bp, Lb): padding sequences hold >= 1 token each, and
    # padding tokens need a padding sequence to hold them
    assert cache.prefill_key_for(16, 1, 16) == ("prefill", 16, 1, 64)  # exact fit, no padding
    assert cache.prefill_key_for(10, 1, 10) == ("prefill", 16, 2, 64)
    assert cache.prefill_key_for(16, 3, 9) == ("prefill", 32, 4, 64)  # 16 + 1 pad seq > 16
    assert cache.prefill_key_for(15, 3, 9) == ("prefill", 16, 4, 64)
    assert cache.prefill_key_for(300, 8, 70) == ("prefill", 512, 9, 128)  # 9: 8 + a pad seq
    assert cache.prefill_key_for(513, 2, 400) is None  # beyond the largest prefill bucket
    assert set(cache.keys()) >= {("prefill", 16, 1, 64), ("prefill", 512, 9, 128)}
    assert attach_graph_cache(engine).prefill_buckets == ()  # eager on CPU: prefill unbucketed


def test_padded_step_equals_unpadded(llama_artifact):
    plain, bucketed = load(llama_artifact, max_num_seqs=8), load(llama_artifact, max_num_seqs=8)
    attach_graph_cache(bucketed)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]  # batch 3 -> bucket 4
    a = plain.generate(prompts, max_tokens=12, ignore_eos=True)
    b = bucketed.generate(prompts, max_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    stats = bucketed.runner.stats
    assert stats.builds >= 1 and stats.hits > 0


def random_steps(plain, bucketed, cache, seed, steps=1000, longest=30, batch=6, tokens=25) -> int:
    """Generate random batches (up to `batch` prompts of up to `longest` tokens, 1..`tokens` new
    tokens) on both engines until `bucketed` ran `steps` steps through `cache`; the tokens must
    be equal every time. Returns the number of generate calls."""
    rng, hits, calls = random.Random(seed), 0, 0
    while hits < steps:
        prompts = [
            [rng.randrange(3, 300) for _ in range(rng.randint(1, longest))]
            for _ in range(rng.randint(1, batch))
        ]
        max_tokens = rng.randint(1, tokens)
        before = cache.stats.hits
        a = plain.generate(prompts, max_tokens=max_tokens, ignore_eos=True)
        b = bucketed.generate(prompts, max_tokens=max_tokens, ignore_eos=True)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        hits += cache.stats.hits - before
        calls += 1
    return calls


def test_thousand_random_steps_after_warmup_build_nothing(llama_artifact):
    plain, bucketed = load(llama_artifact, max_num_seqs=8), load(llama_artifact, max_num_seqs=8)
    cache = attach_graph_cache(bucketed, warmup=True)
    built = cache.stats.builds
    assert built == len(cache.batch_buckets) * len(cache.kv_buckets)
    random_steps(plain, bucketed, cache, seed=0, longest=40, batch=7, tokens=60)
    assert cache.stats.builds == built  # every step hit a warmed-up bucket
    assert cache.stats.hits >= 1000


def test_lru_eviction(llama_artifact):
    engine = load(llama_artifact, max_num_seqs=8)
    cache = attach_graph_cache(engine, max_entries=2)
    for batch in (1, 2, 3, 5):  # buckets 1, 2, 4, 8 at one kv length
        engine.generate([[7, 8]] * batch, max_tokens=3)
    assert len(cache.entries) == 2
    assert cache.stats.evictions == 2
    assert list(cache.entries) == [("decode", 4, 64), ("decode", 8, 64)]


def test_lru_eviction_under_a_memory_budget(llama_artifact):
    engine = load(llama_artifact, max_num_seqs=8)
    # an entry holds its [7, batch] int64 input buffer: room for batches 2 and 8, not 1 more
    cache = attach_graph_cache(engine, max_bytes=7 * 8 * (2 + 8))
    for batch in (1, 2, 5):  # buckets 1, 2, 8 at one kv length
        engine.generate([[7, 8]] * batch, max_tokens=3)
    assert cache.nbytes == 7 * 8 * (2 + 8) <= cache.max_bytes
    assert list(cache.entries) == [("decode", 2, 64), ("decode", 8, 64)]
    assert cache.stats.evictions == 1


def test_logits_of_a_padded_step(llama_artifact):
    engine = load(llama_artifact, max_num_seqs=8)
    cache = attach_graph_cache(engine)  # takes slot 0 for padding
    assert [engine.kv_cache.allocate(8) for _ in range(2)] == [1, 2]  # page-mapped: map them
    rows = [[5, 9, 11], [3, 4, 2], [0, 1, 2], [0, 1, 2], [1, 1, 1], [4, 5, 3], [0, 1, 2]]
    kv = engine.kv_cache.tensor
    padded = cache.run_decode(rows, kv)
    inputs = [torch.tensor(r) for r in rows]
    (unpadded,) = engine.runner.graph_module(*engine.runner.params, *inputs, kv)
    torch.testing.assert_close(padded, unpadded, rtol=1e-6, atol=1e-6)


INDUCTOR_RUN = """
import json, sys
from xllm_compile.runtime import load
from xllm_compile.runtime.model_runner import attach_graph_cache
engine = load(sys.argv[1], max_num_seqs=2)
cache = attach_graph_cache(engine, backend="inductor", warmup=True, max_num_seqs=1, prefill=False)
[out] = engine.generate([[1, 2, 3, 4]], max_tokens=6, ignore_eos=True)
s = cache.stats
print(json.dumps({"tokens": out.token_ids, "hits": s.compile_cache_hits,
                  "misses": s.compile_cache_misses, "builds": s.builds}))
"""


def test_inductor_buckets_persist_across_processes(family_models, tmp_path):
    """A second process loading the same artifact finds the compiled bucket on disk."""
    import json
    import os
    import subprocess
    import sys

    from conftest import compile_cli

    _, model_dir, _ = family_models("llama3")
    art = compile_cli(model_dir, tmp_path / "art", "--max-model-len", "64")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", INDUCTOR_RUN, str(art)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["builds"] == second["builds"] == 1  # one bucket: batch 1, kv length 64
    assert first["misses"] >= 1 and first["hits"] == 0
    assert second["misses"] == 0 and second["hits"] >= 1
    [expected] = load(art).generate([[1, 2, 3, 4]], max_tokens=6, ignore_eos=True)
    assert first["tokens"] == second["tokens"] == expected.token_ids


def test_load_with_graph_cache_keeps_every_slot_for_sequences(llama_artifact):
    engine = load(llama_artifact, max_num_seqs=3, graph_cache=True, warmup=True)
    cache = engine.runner
    assert cache.backend == "cpu_graph" and cache.stats.builds == len(cache.entries) > 0
    prompts = [[1, 2], [3, 4, 5], [6]]
    out = engine.generate(prompts, max_tokens=5, ignore_eos=True)  # all three run at once
    plain = load(llama_artifact).generate(prompts, max_tokens=5, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    assert cache.stats.misses == cache.stats.builds  # every step after warm-up was a hit


def test_compile_time_buckets_reach_the_runtime(family_models, tmp_path, capsys):
    from xllm_compile.cli import main

    from conftest import compile_cli

    _, model_dir, _ = family_models("llama3")
    art = compile_cli(
        model_dir,
        tmp_path / "art",
        "--max-model-len",
        "100",
        "--max-num-seqs",
        "6",
        "--buckets",
        "decode=1,3;prefill=8,24;kv=32",
    )
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["buckets"] == {
        "decode_batch": [1, 3, 6],
        "prefill_tokens": [8, 24],
        "kv_len": [32, 100],
    }
    cache = load(art, graph_cache=True).runner
    assert cache.batch_buckets == (1, 3, 6) and cache.kv_buckets == (32, 100)
    assert load(art, graph_cache="inductor").runner.prefill_buckets == (8, 24)
    assert main(["inspect", str(art)]) == 0
    assert re.search(r"buckets decode_batch\s+1,3,6\n", capsys.readouterr().out)
    assert main(["compile", str(model_dir), "--out", str(tmp_path / "b"), "--buckets", "x=1"]) == 2


def _prefill_rows(engine, prompts):
    from xllm_compile.runtime.sampler import SamplingParams
    from xllm_compile.runtime.sequence import Sequence

    seqs = []
    for p in prompts:
        seq = Sequence(p, SamplingParams())
        seq.slot = engine.kv_cache.allocate(len(p))
        seqs.append(seq)
    return engine.runner.step_rows(seqs)


def test_logits_of_a_padded_prefill(llama_artifact):
    """A prefill padded to its bucket gives the unpadded program's logits for every real row."""
    engine = load(llama_artifact, max_num_seqs=8)
    cache = attach_graph_cache(engine, prefill=True)
    rows = _prefill_rows(engine, [[5, 9, 11, 4, 4], [3, 4, 2, 8, 9, 10, 11], [7, 7]])
    kv = engine.kv_cache.tensor
    padded = cache.run_rows(rows, kv)
    assert list(cache.entries) == [("prefill", 16, 4, 64)]  # 14 tokens + 1 pad seq, 3 + 1 seqs
    inputs = [torch.tensor(r) for r in rows]
    (unpadded,) = engine.runner.graph_module(*engine.runner.params, *inputs, kv)
    assert padded.shape == unpadded.shape == (3, unpadded.shape[1])
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)


def test_thousand_random_prefill_and_decode_steps_after_warmup(llama_artifact):
    """Random batch compositions through prefill and decode buckets after warm-up: zero builds,
    and the same tokens as the unbucketed engine."""
    plain = load(llama_artifact, max_num_seqs=6)
    bucketed = load(llama_artifact, max_num_seqs=6)
    cache = attach_graph_cache(bucketed, prefill=True, buckets={"prefill_tokens": [16, 64, 128]})
    cache.warmup(bucketed.kv_cache.tensor)
    built = cache.stats.builds
    assert built == len(cache.keys()) == len(cache.entries)
    prefills = random_steps(plain, bucketed, cache, seed=1)
    assert cache.stats.builds == built  # every step hit a warmed-up bucket
    assert sum(1 for k, e in cache.entries.items() if k[0] == "prefill" and e.uses) >= 5
    assert prefills >= 40


def test_engine_warmup_builds_every_bucket(llama_artifact):
    engine = load(llama_artifact, max_num_seqs=2, graph_cache="eager")
    engine.warmup()
    cache = engine.runner
    assert (
        cache.stats.builds == len(cache.keys()) == len(cache.batch_buckets) * len(cache.kv_buckets)
    )
    engine.generate([[1, 2, 3]], max_tokens=4)
    assert cache.stats.builds == len(cache.keys())  # nothing built on use
    assert engine.graph_cache_stats is cache.stats and engine.graph_cache_stats.hits >= 3
    load(llama_artifact).warmup()  # no graph cache: a no-op
