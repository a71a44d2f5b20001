"""The step pool (kernels/cpu/xllm_pool.cpp): a CpuProgram replay holding ATen's threads for all
its ops, quantized linears split by what each thread prefetched of them. A pooled replay gives
the same bits as the op-by-op one, on batch 1 and beyond, odd row counts and a one-thread
process; every linear bigger than a grain goes through it (counted); a failing step leaves the
pool usable; decode buckets replay on it unless XLLM_STEP_POOL=0."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import fx

from xllm_compile.kernels.cpu import ensure_loaded
from xllm_compile.runtime import load
from xllm_compile.runtime.cpu_graph import CpuGraph

from conftest import EXAMPLE, compile_cli

pytestmark = pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ CPU kernels")

LQ = importlib.import_module("xllm_compile.kernels.linear_q")
ROWS = (1024, 1001, 576)  # three linears of K = 576: every one past the kernel's grain


@pytest.fixture
def threads():
    """Two intra-op threads (the pool needs a second one), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def _stats() -> dict:
    runs, tasks, linears, rows, held = torch.ops.xllm.pool_stats()
    return {"runs": runs, "tasks": tasks, "linears": linears, "rows": rows, "held": held}


def _chain(batch: int, qtype: str = "q4_1"):
    """x -> linear_q.out -> * 0.5 -> linear_q.out -> + 1 -> linear_q.out (static outputs), with
    the weights and the same chain as plain op calls."""
    torch.manual_seed(0)
    k = 576
    weights, outs = [], []
    graph = fx.Graph()
    h = graph.placeholder("x")
    gm_attrs = {}
    for i, n in enumerate(ROWS):
        w = LQ.quantize(torch.randn(n, k) * 0.05, qtype)
        weights.append(w)
        outs.append(torch.empty(batch, n))
        gm_attrs[f"w{i}"], gm_attrs[f"o{i}"] = w, outs[-1]
        y = graph.call_function(
            torch.ops.xllm.linear_q.out,
            (h, graph.get_attr(f"w{i}"), qtype, None),
            {"out": graph.get_attr(f"o{i}")},
        )
        if i + 1 < len(ROWS):  # glue between the linears, the next one's input [batch, 576]
            glue = torch.ops.aten.mul.Tensor if i == 0 else torch.ops.aten.add.Tensor
            y = graph.call_function(torch.ops.aten.narrow.default, (y, 1, 0, k))
            h = graph.call_function(glue, (y, 0.5 if i == 0 else 1.0))
    graph.output((y,))
    gm = fx.GraphModule(gm_attrs, graph)
    for name in gm_attrs:  # plain attributes, the tensors themselves (as a folded program's)
        gm.__dict__[name] = gm._buffers.pop(name)
    x = torch.randn(batch, k)

    def plain(x):
        h = x
        for i, w in enumerate(weights):
            y = torch.ops.xllm.linear_q(h, w, qtype)
            if i + 1 < len(weights):
                y = y[:, :k]
                h = y * 0.5 if i == 0 else y + 1.0
        return y

    return gm, x, plain


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_pooled_linears_are_the_op_by_op_bits(threads, batch, qtype):
    gm, x, plain = _chain(batch, qtype)
    with torch.inference_mode():
        graph = CpuGraph.capture(gm, (x,), pool=True)
        program = graph.program
        assert program is not None
        before = _stats()
        replays = 6
        for r in range(replays):
            x.copy_(torch.randn_like(x) * (r + 1))
            want = plain(x)
            got = graph.replay()[0]
            assert torch.equal(got, want)
            program.set_pool(False)  # the same program op by op: the same bits
            assert torch.equal(graph.replay()[0], want)
            program.set_pool(True)
        after = _stats()
    assert program.pool_runs() == replays
    assert after["runs"] - before["runs"] == replays
    assert after["linears"] - before["linears"] == replays * len(ROWS)  # every linear shared
    assert after["rows"] - before["rows"] == replays * sum(ROWS)
    held = after["held"] - before["held"]
    assert 0 <= held <= replays * sum(ROWS)
    if batch > 1:  # beyond batch 1 the shares stay even: no prefetched rows counted
        assert held == 0


def test_one_thread_runs_plainly():
    gm, x, plain = _chain(1)
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            graph = CpuGraph.capture(gm, (x,), pool=True)
            before = _stats()
            assert torch.equal(graph.replay()[0], plain(x))
            assert graph.program.pool_runs() == 0 and _stats() == before
    finally:
        torch.set_num_threads(before_threads)


def test_a_failing_step_leaves_the_pool_usable(threads):
    """aten::index out of range inside a pooled replay raises; the next replay runs pooled."""
    aten = torch.ops.aten
    graph = fx.Graph()
    x, i = graph.placeholder("x"), graph.placeholder("i")
    a = graph.call_function(aten.mul.Tensor, (x, 2.0))
    b = graph.call_function(aten.index.Tensor, (a, [i]))
    graph.output((b,))
    gm = fx.GraphModule({}, graph)
    xv, iv = torch.arange(6.0).view(3, 2), torch.tensor([2, 0])
    with torch.inference_mode():
        cg = CpuGraph.capture(gm, (xv, iv), pool=True)
        before = _stats()
        assert torch.equal(cg.replay()[0], 2 * xv[[2, 0]])
        iv.copy_(torch.tensor([7, 0]))
        with pytest.raises(IndexError):
            cg.replay()
        iv.copy_(torch.tensor([1, 1]))
        assert torch.equal(cg.replay()[0], 2 * xv[[1, 1]])
    assert _stats()["runs"] - before["runs"] == 3  # the failed one ran on the pool too
    assert cg.program.pool_runs() == 2  # replays that returned


def _decode_engine(art, monkeypatch, pool: str):
    from xllm_compile.runtime.sampler import SamplingParams
    from xllm_compile.runtime.sequence import Sequence

    monkeypatch.setenv("XLLM_STEP_POOL", pool)
    engine = load(art, max_num_seqs=2, graph_cache="cpu_graph")
    seqs = [Sequence(list(p), SamplingParams()) for p in ([1, 2, 3], [4, 5, 6, 7, 8])]
    for seq in seqs:
        seq.slot = engine.kv_cache.allocate(len(seq.prompt_ids) + 8)
    tokens = []
    with torch.inference_mode():
        logits = engine.run_step(seqs)
        for _ in range(4):
            step = logits.argmax(-1).tolist()
            tokens.append(step)
            for seq, token in zip(seqs, step, strict=True):
                seq.output_ids.append(token)
            logits = engine.run_step(seqs)
    return engine, seqs, tokens, logits


def test_decode_buckets_replay_on_the_pool(tmp_path, monkeypatch, threads):
    art = compile_cli(EXAMPLE, tmp_path / "q4_1", "--quant", "q4_1")
    engine, seqs, tokens, logits = _decode_engine(art, monkeypatch, "1")
    entries = list(engine.runner.entries.values())
    assert entries and all(e.graph.program.pool_runs() > 0 for e in entries)
    with torch.inference_mode():
        for entry in entries:  # the same bucket op by op: the same bits
            pooled = entry.graph.replay()[0].clone()
            entry.graph.program.set_pool(False)
            assert torch.equal(entry.graph.replay()[0], pooled)
    off, seqs_off, tokens_off, logits_off = _decode_engine(art, monkeypatch, "0")
    assert all(e.graph.program.pool_runs() == 0 for e in off.runner.entries.values())
    assert tokens == tokens_off and torch.equal(logits, logits_off)
    for e, ss in ((engine, seqs), (off, seqs_off)):
        for seq in ss:
            e.kv_cache.free(seq.slot)
