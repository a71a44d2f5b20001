"""The graph cache over the activation arena: the artifact stores a plan per bucket shape
(planned at compile time, on the program as the runtime loads it), the runtime builds every
bucket's program over one arena holding its static inputs, intermediates and logits, and the
tokens equal the unbucketed engine's; plans that do not fit the program are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_graph_cache import _prefill_rows, random_steps

from xllm_compile import arena_plans, artifact
from xllm_compile.buckets import key_sizes, step_shapes
from xllm_compile.errors import ArtifactError, ConfigError
from xllm_compile.runtime import load
from xllm_compile.runtime.model_runner import attach_graph_cache
from xllm_compile.trace import INPUT_NAMES

from conftest import compile_cli

PREFILL = {"prefill_tokens": [16, 64, 128]}


def _plans(art_dir):
    art = artifact.open_artifact(art_dir)
    engine = load(art_dir)
    text = art.file(arena_plans.FILE).read_text()
    return art.manifest, arena_plans.loads(text, engine.runner.graph_module.graph), engine


def _in_arena(t: torch.Tensor, cache) -> bool:
    start = cache.arena.vrange.address
    return start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + cache.arena.nbytes


def test_artifact_holds_a_plan_for_every_bucket_shape(llama_artifact):
    manifest, plans, engine = _plans(llama_artifact)
    assert manifest["arena_plans"] == {"file": arena_plans.FILE, "plans": len(plans)}
    assert arena_plans.FILE in manifest["files"]  # hashed like every file of the artifact
    ex = engine.runner
    first = len(ex.params)  # placeholders: the weights, the seven index inputs, the KV cache
    token_inputs = {first + INPUT_NAMES.index(n) for n in ("input_ids", "logits_indices")}
    shapes = step_shapes(manifest["buckets"], manifest["limits"]["max_num_seqs"])
    kv = engine.kv_cache.tensor
    for tokens, seqs in shapes:
        sizes = (tokens, tokens, tokens, seqs, seqs, seqs, seqs)
        idx = [torch.empty(n, dtype=torch.int64, device="meta") for n in sizes]
        for kv_len in manifest["buckets"]["kv_len"]:
            plan = arena_plans.find_plan(plans, [*ex.params, *idx, kv[:, :, :, :kv_len]])
            assert plan is not None and plan.arena_bytes > 0
    # one plan per distinct (tokens, logits rows): the sizes the activations depend on; the kv
    # length and the number of sequences never appear in a guard
    assert len(plans) == len(set(shapes))
    for plan in plans:
        assert {i for i, _, _ in plan.guards} >= token_inputs
        assert all(i < first + len(INPUT_NAMES) - 3 or i == first + 6 for i, _, _ in plan.guards)
    # the file round-trips exactly
    again = arena_plans.loads(
        arena_plans.dumps(plans, ex.graph_module.graph), ex.graph_module.graph
    )
    assert [p.to_json() for p in again] == [p.to_json() for p in plans]


def test_padded_steps_over_the_arena_equal_the_plain_program(llama_artifact):
    """A decode and a prefill step through arena programs: logits equal the unpadded program's,
    and the entry's inputs and returned logits live in the arena."""
    engine = load(llama_artifact, max_num_seqs=8)
    manifest, plans, _ = _plans(llama_artifact)
    buckets = {**manifest["buckets"], **PREFILL}
    cache = attach_graph_cache(engine, prefill=True, buckets=buckets, arena_plans=plans, arena=True)
    kv = engine.kv_cache.tensor
    rows = _prefill_rows(engine, [[5, 9, 11, 4, 4], [3, 4, 2, 8, 9, 10, 11], [7, 7]])
    padded = cache.run_rows(rows, kv).clone()
    inputs = [torch.tensor(r) for r in rows]
    (unpadded,) = engine.runner.graph_module(*engine.runner.params, *inputs, kv)
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)
    entry = cache.entries[("prefill", 16, 4, 64)]
    assert _in_arena(entry.buffer, cache) and cache.stats.arena_programs == 1
    # a decode step of the same three sequences
    slots = rows[3]
    seqs_rows = [[1, 2, 3], [5, 7, 2], slots, slots, [1, 1, 1], [6, 8, 3], [0, 1, 2]]
    logits = cache.run_rows(seqs_rows, kv)
    assert _in_arena(logits, cache)  # the static output is an arena view
    (plain,) = engine.runner.graph_module(
        *engine.runner.params, *[torch.tensor(r) for r in seqs_rows], kv
    )
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    # both buckets share one input region at the arena's start
    decode = cache.entries[("decode", 4, 64)]
    assert decode.buffer.data_ptr() == entry.buffer.data_ptr() == cache.arena.vrange.address
    assert cache.stats.arena_programs == 2


def test_thousand_random_steps_over_the_arena(llama_artifact):
    """Random batch compositions through prefill and decode buckets, every program over one
    arena, after warm-up: zero builds, the unbucketed engine's tokens, and the arena mapped to
    the input region plus the largest plan used, not the sum of the buckets."""
    plain = load(llama_artifact, max_num_seqs=6)
    bucketed = load(llama_artifact, max_num_seqs=6)
    manifest, plans, _ = _plans(llama_artifact)
    buckets = {**manifest["buckets"], **PREFILL}  # the artifact's decode and kv buckets
    cache = attach_graph_cache(
        bucketed, prefill=True, buckets=buckets, arena_plans=plans, arena=True
    )
    cache.warmup(bucketed.kv_cache.tensor)
    built = cache.stats.builds
    assert built == len(cache.keys()) == cache.stats.arena_programs  # every bucket has a plan
    kv, params = bucketed.kv_cache.tensor, bucketed.runner.params
    biggest = 0
    for key in cache.keys():
        meta = [torch.empty(n, dtype=torch.int64, device="meta") for n in key_sizes(key)]
        plan = arena_plans.find_plan(plans, [*params, *meta, kv[:, :, :, : key[-1]]])
        biggest = max(biggest, plan.arena_bytes)
    page = cache.arena.pool.page_size
    assert cache.arena.nbytes == -(-(cache._input_bytes + biggest) // page) * page
    total = sum(p.arena_bytes for p in plans)
    assert cache.arena.nbytes < total / 10  # one arena for all, not one per bucket
    random_steps(plain, bucketed, cache, seed=2)
    assert cache.stats.builds == built


def test_load_runs_the_arena_from_the_artifact(llama_artifact):
    engine = load(llama_artifact, max_num_seqs=4, graph_cache="eager", arena=True)
    cache = engine.runner
    assert cache.use_arena and cache.plans
    plain = load(llama_artifact, max_num_seqs=4)
    prompts = [[4, 8, 15, 16], [23, 42]]
    a = plain.generate(prompts, max_tokens=10, ignore_eos=True)
    b = engine.generate(prompts, max_tokens=10, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert cache.stats.arena_programs == cache.stats.builds >= 1 and cache.arena_bytes > 0
    # eager without asking: no arena (on CPU it buys memory, not speed); inductor plans its own
    assert not load(llama_artifact, graph_cache="eager").runner.use_arena
    with pytest.raises(ConfigError, match="Inductor"):
        load(llama_artifact, graph_cache="inductor", arena=True)
    with pytest.raises(ConfigError, match="graph cache"):
        load(llama_artifact, arena=True)


def _rewrite(art_dir, name: str, text: str | None) -> None:
    """Replace (None: delete) one file of an artifact and re-hash the manifest, as a compiler
    of another version would have written it."""
    manifest = json.loads((art_dir / artifact.MANIFEST).read_text())
    if text is None:
        (art_dir / name).unlink()
        del manifest["files"][name]
    else:
        (art_dir / name).write_text(text)
        manifest["files"][name] = {
            "sha256": artifact.sha256_file(art_dir / name),
            "bytes": (art_dir / name).stat().st_size,
        }
    (art_dir / artifact.MANIFEST).write_text(json.dumps(manifest))


def test_plans_for_another_program_are_refused(llama_artifact, tmp_path, caplog):
    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    body = json.loads((art / arena_plans.FILE).read_text())
    body["graph"] = "0" * 64
    _rewrite(art, arena_plans.FILE, json.dumps(body))
    with pytest.raises(ConfigError, match="no usable arena plans"):
        load(art, graph_cache="eager", arena=True)
    assert "made for another program" in caplog.text  # the log says why
    assert not load(art, graph_cache="eager").runner.use_arena  # still serves
    # tampering without re-hashing is caught by the manifest like any other file
    (art / arena_plans.FILE).write_text("{}")
    with pytest.raises(ArtifactError, match="arena_plans.json"):
        load(art)


def test_malformed_plans_name_the_file(llama_artifact):
    graph = load(llama_artifact).runner.graph_module.graph
    fingerprint = arena_plans.graph_fingerprint(graph)
    bad = [
        "not json",
        json.dumps({"format": 99, "graph": fingerprint, "plans": []}),
        json.dumps({"format": 1, "graph": fingerprint, "plans": [{"arena_bytes": 1}]}),
        json.dumps(
            {
                "format": 1,
                "graph": fingerprint,
                "plans": [
                    {
                        "arena_bytes": 64,
                        "guards": [],
                        "buffers": {
                            "mm": {"offset": 0, "shape": [1], "dtype": "float32"}
                            | {"op": "os::system.default", "out": "out", "args": None}
                        },
                    }
                ],
            }
        ),
    ]
    for text in bad:
        with pytest.raises(ArtifactError, match=arena_plans.FILE):
            arena_plans.loads(text, graph)


def test_an_artifact_without_plans_still_serves(family_models, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(family_models("qwen2")[2], art)
    _rewrite(art, arena_plans.FILE, None)
    engine = load(art, graph_cache="eager")
    assert not engine.runner.use_arena
    assert engine.generate([[1, 2, 3]], max_tokens=3, ignore_eos=True)[0].token_ids
    with pytest.raises(ConfigError, match="no usable arena plans"):
        load(art, graph_cache="eager", arena=True)


def test_cli_generate_with_arena(llama_artifact, capsys):
    from xllm_compile.cli import main

    args = ["generate", str(llama_artifact), "--token-ids", "1,2,3", "--max-tokens", "4"]
    assert main([*args, "--graph-cache", "eager", "--arena"]) == 0
    with_arena = capsys.readouterr().out
    assert main(args) == 0  # the default: CPU graphs, over the arena
    assert capsys.readouterr().out == with_arena
    assert main([*args, "--graph-cache", "none"]) == 0
    assert capsys.readouterr().out == with_arena
    assert main([*args, "--graph-cache", "none", "--arena"]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "graph cache" in err and "Traceback" not in err


def test_compile_with_custom_buckets_plans_them(family_models, tmp_path):
    art = compile_cli(
        family_models("llama3")[1], tmp_path / "b", "--buckets", "decode=1,3;prefill=32;kv=64"
    )
    manifest, plans, _ = _plans(art)
    shapes = set(step_shapes(manifest["buckets"], manifest["limits"]["max_num_seqs"]))
    assert len(plans) == len(shapes)
    assert {(1, 1), (3, 3), (32, 1), (32, 3)} <= shapes
