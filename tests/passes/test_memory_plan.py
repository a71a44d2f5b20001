"""Memory planning: reuse across dead buffers, in place where safe (and its near misses), aliases
extending lifetimes, what stays unplanned, the offset assignment on random interval sets, and the
plan recorded in a compiled artifact's manifest."""

from __future__ import annotations

import json
import operator
import random
import re

import pytest
import torch
from torch import fx

import xllm_compile.kernels  # noqa: F401  (registers the xllm:: ops)
from xllm_compile.passes.memory_plan import (
    ALIGNMENT,
    greedy_by_size,
    max_live_bytes,
    out_variant,
    plan_memory,
)
from xllm_compile.runtime.arena import build_arena_runner, make_arena

aten = torch.ops.aten
T, D = 8, 16  # [T, D] fp32: 512 bytes, a multiple of the alignment


class Builder:
    """A tiny fx graph written op by op: `b.call(aten.mm.default, x, w)`."""

    def __init__(self, *inputs: str) -> None:
        self.graph = fx.Graph()
        self.inputs = [self.graph.placeholder(name) for name in inputs]

    def call(self, op, *args, name: str | None = None):
        node = self.graph.call_function(op, args)
        if name:
            node.name = name
        return node

    def done(self, *outputs) -> fx.GraphModule:
        self.graph.output(tuple(outputs))
        return fx.GraphModule(torch.nn.Module(), self.graph)


def args(n: int, shape=(T, D)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_dead_buffers_are_reused():
    """Four mms in a chain: each result dies at the next, so two slots hold all four."""
    b = Builder("x", "w")
    x, w = b.inputs
    h = x
    for i in range(4):
        h = b.call(aten.mm.default, h, w, name=f"mm{i}")
    gm = b.done(h)
    plan = plan_memory(gm, args(2, (D, D)))
    plan.check()
    assert plan.num_planned == 4 and plan.num_unplanned == 0 and plan.num_inplace == 0
    size = D * D * 4
    assert plan.naive_bytes == 4 * size
    assert plan.arena_bytes == plan.live_lower_bound_bytes == 2 * size
    offsets = [plan.buffers[f"mm{i}"].offset for i in range(4)]
    assert offsets[0] == offsets[2] and offsets[1] == offsets[3] and offsets[0] != offsets[1]


def test_pointwise_op_writes_over_an_input_that_dies_there():
    b = Builder("x", "y")
    x, y = b.inputs
    a = b.call(aten.add.Tensor, x, y, name="a")
    r = b.call(aten.relu.default, a, name="r")  # a dies here: in place
    m = b.call(aten.mul.Tensor, r, y, name="m")  # r dies here: in place, chained
    gm = b.done(m)
    plan = plan_memory(gm, args(2))
    plan.check()
    assert plan.buffers["r"].reuses == "a" and plan.buffers["m"].reuses == "r"
    assert plan.num_inplace == 2
    assert plan.arena_bytes == plan.live_lower_bound_bytes == T * D * 4  # one buffer for all three
    assert plan.naive_bytes == 3 * T * D * 4


def test_no_in_place_when_the_input_lives_on_or_is_read_through_a_view():
    """Near misses: `a` read again after relu; `c` read by the same op through a transpose; a
    dtype change; a broadcast input of another shape."""
    b = Builder("x", "y", "v")
    x, y, v = b.inputs
    a = b.call(aten.add.Tensor, x, y, name="a")
    r = b.call(aten.relu.default, a, name="r")
    s = b.call(aten.add.Tensor, r, a, name="s")  # r dies here, but so does a: one reuse only
    c = b.call(aten.mm.default, x, x, name="c")  # [T, T] with T == D
    ct = b.call(aten.t.default, c)
    e = b.call(aten.add.Tensor, c, ct, name="e")  # reads c through a transpose: no reuse
    f = b.call(aten.gt.Scalar, e, 0.0, name="f")  # bool result: another dtype, no reuse
    g = b.call(aten.mul.Tensor, v, f, name="g")  # v [T, 1] broadcasts; v is an input anyway
    gm = b.done(s, g)
    plan = plan_memory(gm, [*args(2, (T, T)), torch.randn(T, 1)])
    plan.check()
    assert plan.buffers["r"].reuses is None  # a is still read by s
    assert plan.buffers["s"].reuses == "r"  # the first argument dying there wins
    assert plan.buffers["e"].reuses is None and plan.buffers["f"].reuses is None
    assert plan.buffers["g"].reuses is None
    assert plan.num_inplace == 1


def test_views_extend_the_lifetime_of_their_base():
    """`a` is only read through a view near the end: its buffer must survive until then, so it
    cannot share memory with `b1`/`b2`, which live in between."""
    b = Builder("x", "w")
    x, w = b.inputs
    a = b.call(aten.mm.default, x, w, name="a")
    va = b.call(aten.view.default, a, [D, T])
    b1 = b.call(aten.mm.default, x, w, name="b1")
    b2 = b.call(aten.mm.default, b1, w, name="b2")
    last = b.call(aten.mm.default, va, b2, name="last")  # [D, T] @ [T, D]
    gm = b.done(last)
    plan = plan_memory(gm, [torch.randn(T, D), torch.randn(D, D)])
    plan.check()
    a_buf = plan.buffers["a"]
    assert a_buf.end == plan.buffers["last"].start  # the view's use, not a's own (none)
    for other in ("b1", "b2"):
        o = plan.buffers[other]
        assert o.offset >= a_buf.offset + a_buf.size or a_buf.offset >= o.offset + o.size
    assert plan.arena_bytes >= plan.live_lower_bound_bytes


def test_inputs_custom_and_multi_output_ops_are_not_planned():
    b = Builder("x", "w")
    x, w = b.inputs
    xv = b.call(aten.view.default, x, [T * D])  # a view of an input: the input's memory
    n = b.call(torch.ops.xllm.rms_norm.default, x, w, 1e-6, name="norm")
    both = b.call(torch.ops.xllm.fused_add_rms_norm.default, n, x, w, 1e-6, name="fused")
    h = b.call(operator.getitem, both, 0)
    o = b.call(aten.mul.Tensor, h, 2.0, name="o")
    gm = b.done(xv, o)
    plan = plan_memory(gm, [torch.randn(T, D), torch.ones(D)])
    plan.check()
    assert list(plan.buffers) == ["o"]
    assert plan.unplanned == {"norm": "no out= variant", "fused": "multi-output op"}
    assert plan.summary()["unplanned_why"] == {"no out= variant": 1, "multi-output op": 1}


def test_attention_is_planned_where_its_out_writes_in_place():
    """xllm::attention.out writes into the arena on CPU; on another device it would run the op
    and copy (one more kernel a layer), so there the result keeps allocating."""
    b = Builder("q", "cache", "pos", "slots", "qlens", "slens")
    q, cache, pos, slots, qlens, slens = b.inputs
    o = b.call(torch.ops.xllm.attention.default, q, cache, 0, pos, slots, qlens, slens, 0.5, 0,
               name="attn")  # fmt: skip
    gm = b.done(b.call(aten.mul.Tensor, o, 2.0, name="o"))
    one = torch.ones(1, dtype=torch.int64)
    args = [torch.randn(1, 4, 8), torch.randn(1, 2, 1, 16, 2, 8), one, one, one, one]
    on_cpu = plan_memory(gm, args)
    assert set(on_cpu.buffers) == {"attn", "o"}
    assert on_cpu.buffers["attn"].call.op is torch.ops.xllm.attention.out
    on_cuda = plan_memory(gm, args, device="cuda")
    assert set(on_cuda.buffers) == {"o"}
    assert on_cuda.unplanned == {"attn": "out= variant copies on cuda"}


def test_out_variants():
    assert out_variant(torch.ops.xllm.attention.default) == (torch.ops.xllm.attention.out, "out")
    assert out_variant(aten.mm.default) == (aten.mm.out, "out")
    assert out_variant(torch.ops.xllm.linear.default) == (torch.ops.xllm.linear.out, "out")
    assert out_variant(torch.ops.xllm.rms_norm.default) is None
    assert out_variant(aten.add.Tensor) == (aten.add.out, "out")
    assert out_variant(aten.pow.Tensor_Scalar) == (aten.pow.Tensor_Scalar_out, "out")
    assert out_variant(aten.index.Tensor) == (aten.index.Tensor_out, "out")
    assert out_variant(aten.linear.default) == (aten.linear.out, "out")
    assert out_variant(aten.slice.Tensor) is None  # a view: nothing to write
    assert out_variant(torch.ops.xllm.rms_norm.default) is None


def test_embedding_writes_through_index_select():
    """embedding.out is a generated wrapper (allocate, then copy); index_select.out is the kernel
    embedding runs for 1-D ids, writing straight into the arena."""
    b = Builder("w", "ids")
    w, ids = b.inputs
    gm = b.done(b.call(aten.embedding.default, w, ids, name="emb"))
    plan = plan_memory(gm, [torch.randn(50, D), torch.tensor([3, 1, 4])])
    assert plan.buffers["emb"].call.op == aten.index_select.out


def test_random_intervals():
    """Buffers live at the same time never overlap; lower bound <= arena <= naive."""
    for seed in range(300):
        _check_random_intervals(random.Random(seed))


def _check_random_intervals(rng: random.Random) -> None:
    n, horizon = rng.randint(1, 60), rng.randint(1, 80)
    intervals = []
    for _ in range(n):
        start = rng.randrange(horizon)
        end = min(horizon, start + int(rng.expovariate(1 / 8)))
        intervals.append((start, end, rng.choice([0, 1, 63, 64, 100, 4096, rng.randint(1, 5000)])))
    offsets, arena = greedy_by_size(intervals)
    sizes = [-(-s // ALIGNMENT) * ALIGNMENT for _, _, s in intervals]
    for i, (s1, e1, _) in enumerate(intervals):
        assert offsets[i] % ALIGNMENT == 0 and offsets[i] + sizes[i] <= arena
        for j in range(i + 1, n):
            s2, e2, _ = intervals[j]
            if e1 < s2 or e2 < s1 or not sizes[i] or not sizes[j]:
                continue
            assert offsets[i] + sizes[i] <= offsets[j] or offsets[j] + sizes[j] <= offsets[i]
    assert max_live_bytes(intervals) <= arena <= sum(sizes)


def test_arena_program_on_a_small_graph_is_exact_and_in_place():
    b = Builder("x", "w", "y")
    x, w, y = b.inputs
    h = b.call(aten.mm.default, x, w, name="h")
    a = b.call(aten.add.Tensor, h, y, name="a")  # in place over h
    r = b.call(aten.relu.default, a, name="r")  # in place over a
    o = b.call(aten.mm.default, r, w, name="o")
    gm = b.done(o, r)
    inputs = [torch.randn(T, D), torch.randn(D, D), torch.randn(T, D)]
    arena = make_arena("cpu", capacity=1 << 20)
    try:
        plan = plan_memory(gm, inputs)
        program = build_arena_runner(gm, plan, arena)
        assert plan.num_inplace == 2
        expected = gm(*inputs)
        got = program(*inputs)
        assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
        base = arena.vrange.address
        assert got[1].data_ptr() - base == plan.buffers["h"].offset  # relu wrote over mm's output
        assert got[0].data_ptr() - base == plan.buffers["o"].offset
        with pytest.raises(ValueError, match="planned for input 0"):
            program(torch.randn(T + 1, D), inputs[1], torch.randn(T + 1, D))
        del program, got
    finally:
        arena.close()


def test_manifest_records_the_plan(llama_artifact, capsys):
    from xllm_compile.cli import main

    manifest = json.loads((llama_artifact / "manifest.json").read_text())
    plans = manifest["memory_plan"]
    limits = manifest["limits"]
    assert plans["decode"]["shapes"]["num_tokens"] == limits["max_num_seqs"]
    assert plans["prefill"]["shapes"]["num_tokens"] == limits["max_num_tokens"]
    for p in plans.values():
        assert p["live_lower_bound_bytes"] <= p["arena_bytes"] < p["naive_bytes"]
        assert p["planned"] > 0 and p["unplanned"] > 0  # the xllm:: ops still allocate
    assert main(["inspect", str(llama_artifact)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"decode arena\s+\S+ \S+ \(\d+% of naive\)", out)
    assert f"bucket plans: {manifest['arena_plans']['plans']} in arena_plans.json" in out
