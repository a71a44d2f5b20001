"""CPU graphs (runtime/cpu_graph.py), the CPU graph cache's default backend: each bucket's
program recorded once over its static buffers (an xllm::CpuProgram, else a trace) and replayed;
the logits of every step are the eager program's bit for bit, over the activation arena (on by
default with them) and without it."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.runtime import load
from xllm_compile.runtime.cpu_graph import CpuGraph

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]


def _steps(engine, prompts, steps: int) -> list[torch.Tensor]:
    """Logits of a prefill and `steps` greedy decode steps of all prompts together."""
    from xllm_compile.runtime.sampler import SamplingParams
    from xllm_compile.runtime.sequence import Sequence

    seqs = [Sequence(list(p), SamplingParams()) for p in prompts]
    for seq in seqs:
        seq.slot = engine.kv_cache.allocate(len(seq.prompt_ids) + steps + 1)
    out = []
    with torch.inference_mode():
        logits = engine.run_step(seqs)
        out.append(logits.clone())
        for _ in range(steps):
            for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                seq.output_ids.append(token)
            logits = engine.run_step(seqs)
            out.append(logits.clone())  # a replay's logits live in the arena: copied
    return out


def test_cpu_graph_logits_are_the_eager_programs(llama_artifact):
    eager = _steps(load(llama_artifact, max_num_seqs=4), PROMPTS, 6)
    for arena in (None, False):
        engine = load(llama_artifact, max_num_seqs=4, graph_cache=True, arena=arena)
        runner = engine.runner
        assert runner.backend == "cpu_graph" and runner.use_arena == (arena is None)
        got = _steps(engine, PROMPTS, 6)
        assert all(torch.equal(a, b) for a, b in zip(got, eager, strict=True))
        graphs = [e.graph for e in runner.entries.values()]
        assert graphs and all(isinstance(g, CpuGraph) for g in graphs)
        assert runner.stats.hits >= 5  # the decode steps replayed a recorded graph
        if arena is None:
            assert runner.stats.arena_programs == len(runner.entries)


def test_cpu_graph_padded_batches_and_generate(llama_artifact):
    """Batches padded up to their bucket (3 -> 4) and generate() give the plain tokens."""
    engine = load(llama_artifact, max_num_seqs=4, graph_cache="cpu_graph", warmup=True)
    out = engine.generate(PROMPTS, max_tokens=8, ignore_eos=True)
    plain = load(llama_artifact).generate(PROMPTS, max_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    assert engine.runner.stats.misses == engine.runner.stats.builds  # warm-up built them all


VIEWS = ("aten::slice", "aten::view", "aten::unsqueeze", "aten::reshape")


def _ops(graph: CpuGraph) -> list[str]:
    """The ops a replay runs: a program's steps, a trace's node kinds (as the program names an
    overload: `xllm::attention.out`; a trace: `xllm::attention`), less constants."""
    if graph.program is not None:
        return graph.program.step_names()
    return [n.kind() for n in graph.traced.graph.nodes() if not n.kind().startswith("prim::")]


@pytest.mark.parametrize("program", [True, False])
def test_cpu_graph_folds_the_views_of_static_tensors(llama_artifact, program):
    """Views of what is the same memory every replay (the qkv and gate/up splits of the arena's
    results, the rotary tables' rows, the [T, H * D] reshape of attention's result, which
    `attention.out` writes into the arena) are made once at capture and passed in: the recorded
    step (an xllm::CpuProgram, else the trace) runs none of them, and every op that computes is
    still there (logits: the tests above)."""
    engine = load(llama_artifact, max_num_seqs=1, graph_cache=True, warmup=True)
    layers = engine.manifest["model"]["config"]["num_layers"]
    assert engine.runner.entries
    for entry in engine.runner.entries.values():
        program_ = entry.callable.graph
        graph = entry.graph
        assert graph.program is not None and graph.traced is None  # the default recording
        if not program:
            base = graph.args[: len(graph.args) - graph.folded]
            graph = CpuGraph.capture(entry.callable, base, program=False)
            assert graph.program is None
            assert len(graph.args) == len(list(graph.traced.graph.inputs())) - 1  # less `self`
        kinds = [k.split(".")[0] for k in _ops(graph)]
        views = [n for n in program_.nodes if str(n.target).split(".")[1:2] == ["slice"]]
        assert len(views) >= 5 * layers  # q, k, v, gate, up
        assert not any(k in VIEWS for k in kinds)
        assert (
            graph.folded
            == sum(
                1
                for n in program_.nodes
                if n.op == "call_function"
                and str(n.target).startswith(("aten.slice.", "aten.view.", "aten.unsqueeze."))
            )
            + layers
        )
        # one reshape a layer, of the planned attention result (in the arena: fixed memory)
        assert kinds.count("xllm::attention") == layers
        assert sum(str(n.target) == "xllm.attention.out" for n in program_.nodes) == layers
        assert sum(str(n.target) == "aten.reshape.default" for n in program_.nodes) == layers
        computing = [n for n in program_.nodes if str(n.target).startswith("xllm.")]
        assert sum(k.startswith("xllm::") for k in kinds) == len(computing)
        assert len(graph.replay()) == 1  # the logits; the unread .out results are not returned


@pytest.mark.parametrize("program", [True, False])
def test_fold_static_views_keeps_copies_and_unread_writes(program):
    """On a hand-made program: the views of an input and of an .out op's static result are
    folded; a reshape that must copy is not; an .out op no op reads any more stays in the
    recording (program or trace); replays see the inputs' new contents through the folded
    views."""
    from torch import fx

    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")  # [4, 6], static: the replay's own tensor
    buf = graph.get_attr("buf")  # [4, 6] arena-like memory
    y = graph.call_function(aten.add.out, (x, x), {"out": buf})
    left = graph.call_function(aten.slice.Tensor, (y, 1, 0, 3))  # a view: folded
    row = graph.call_function(aten.select.int, (x, 0, 1))  # a view of the input: folded
    t = graph.call_function(aten.t.default, (left,))  # a view of a folded view: folded
    flat = graph.call_function(aten.reshape.default, (t, [-1]))  # t is not contiguous: a copy
    unread = graph.call_function(aten.mul.out, (x, x), {"out": graph.get_attr("buf2")})
    out = graph.call_function(
        aten.add.Tensor, (flat, graph.call_function(aten.sum.default, (row,)))
    )
    graph.output((out,))
    gm = fx.GraphModule({"buf": torch.empty(4, 6), "buf2": torch.empty(4, 6)}, graph)
    for name in ("buf", "buf2"):  # plain attributes, as arena programs hold their views
        gm.__dict__[name] = gm._buffers.pop(name)
    del unread
    x0 = torch.arange(24.0).view(4, 6)
    with torch.inference_mode():
        graph_ = CpuGraph.capture(gm, (x0,), program=program)
        assert graph_.folded == 3  # slice, select, t; not the copying reshape
        assert (graph_.program is not None) == program
        kinds = [k.split(".")[0] for k in _ops(graph_)]
        assert "aten::reshape" in kinds and "aten::slice" not in kinds and "aten::t" not in kinds
        assert kinds.count("aten::mul") == 1  # the unread .out write survived
        for scale in (1.0, 3.0):
            x0.copy_(torch.arange(24.0).view(4, 6) * scale)
            (got,) = graph_.replay()
            want = (2 * x0[:, :3]).t().reshape(-1) + x0[1].sum()
            assert torch.equal(got, want)
            assert torch.equal(gm.buf2, x0 * x0)
