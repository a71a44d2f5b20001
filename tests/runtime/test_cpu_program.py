"""xllm::CpuProgram (runtime/cpu_program.py, kernels/cpu/xllm_program.cpp): a CPU graph's steps
run by one C++ loop. Every bucket of the model families' programs becomes one, replays the
TorchScript trace's results bit for bit (direct calls and the boxed path alike, quantized linears
included), hands its ops to the profiler when one listens, times its steps, and leaves a program
it cannot run to the trace."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

from xllm_compile.kernels.cpu import ensure_loaded
from xllm_compile.runtime import load
from xllm_compile.runtime.cpu_graph import CpuGraph

from conftest import EXAMPLE, compile_cli

pytestmark = pytest.mark.skipif(ensure_loaded() is not None, reason="no C++ CPU kernels")

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]


def _base_args(graph: CpuGraph) -> tuple:
    """The arguments the bucket's program was captured on (less the folded views)."""
    return graph.args[: len(graph.args) - graph.folded]


def _engine(artifact):
    """An engine whose decode bucket of 2 was built by steps of two sequences that stay
    allocated: a replay writes their KV rows (a freed sequence's pages may be unmapped)."""
    from xllm_compile.runtime.sampler import SamplingParams
    from xllm_compile.runtime.sequence import Sequence

    engine = load(artifact, max_num_seqs=2, graph_cache="cpu_graph")
    seqs = [Sequence(list(p), SamplingParams()) for p in PROMPTS]
    for seq in seqs:
        seq.slot = engine.kv_cache.allocate(len(seq.prompt_ids) + 8)
    with torch.inference_mode():
        logits = engine.run_step(seqs)
        for _ in range(3):
            for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
                seq.output_ids.append(token)
            logits = engine.run_step(seqs)
    assert engine.runner.entries
    engine.test_seqs = seqs  # freed by _free before the engine serves anything else
    return engine


def _free(engine) -> None:
    for seq in engine.test_seqs:
        engine.kv_cache.free(seq.slot)


def _check_against_trace(engine) -> int:
    """Every built bucket is a program, its replay equals the trace's and the boxed path's;
    returns how many buckets were checked."""
    checked = 0
    with torch.inference_mode():
        for entry in engine.runner.entries.values():
            graph = entry.graph
            assert graph.program is not None and graph.traced is None
            names = graph.program.step_names()
            xllm = sum(n.startswith("xllm::") for n in names)
            assert xllm > 0 and graph.program.num_direct() == xllm  # every xllm op called direct
            trace = CpuGraph.capture(entry.callable, _base_args(graph), program=False)
            assert trace.program is None and trace.traced is not None
            want = [t.clone() for t in trace.replay()]
            got = [t.clone() for t in graph.replay()]
            graph.program.set_direct(False)
            boxed = [t.clone() for t in graph.replay()]
            graph.program.set_direct(True)
            assert len(got) == len(want) == len(boxed) == 1
            assert torch.equal(got[0], want[0]) and torch.equal(boxed[0], want[0])
            checked += 1
    return checked


def test_program_replays_the_trace_bit_for_bit(llama_artifact):
    engine = _engine(llama_artifact)
    assert {key[0] for key in engine.runner.entries} == {"decode"}  # prefill: not graphed
    assert _check_against_trace(engine) == len(engine.runner.entries) >= 1


def test_quantized_program_and_its_tokens(tmp_path):
    """A --quant q4_1 artifact: every bucket a program (linear_q.out called direct), equal to
    its trace, and the graph cache's greedy tokens are the eager program's."""
    art = compile_cli(EXAMPLE, tmp_path / "q4_1", "--quant", "q4_1")
    engine = _engine(art)
    assert _check_against_trace(engine) == len(engine.runner.entries) >= 1
    for entry in engine.runner.entries.values():
        names = entry.graph.program.step_names()
        assert (
            names.count("xllm::linear_q.out")
            >= 4 * engine.manifest["model"]["config"]["num_layers"]
        )
    _free(engine)
    got = engine.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    plain = load(art, max_num_seqs=2).generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]


def test_profile_times_every_step_and_the_profiler_sees_every_op(llama_artifact):
    from torch.profiler import ProfilerActivity, profile

    engine = _engine(llama_artifact)
    entry = next(e for k, e in engine.runner.entries.items() if k[0] == "decode")
    program = entry.graph.program
    with torch.inference_mode():
        timed = entry.graph.profile(3)
        assert [name for name, _ in timed] == program.step_names()
        assert all(s >= 0 for _, s in timed) and sum(s for _, s in timed) > 0
        layers = engine.manifest["model"]["config"]["num_layers"]
        assert sum(name == "xllm::attention.out" for name, _ in timed) == layers
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            entry.graph.replay()
    seen = [e.name for e in prof.events() if e.name.startswith("xllm::")]
    want = [n.split(".")[0] for n in program.step_names() if n.startswith("xllm::")]
    assert sorted(seen) == sorted(want)  # one event per step: the boxed path reported them
    with torch.inference_mode():  # profiling is over: direct calls again, same logits
        assert torch.equal(entry.graph.replay()[0], entry.graph.replay()[0])


def _hand_made(extra: str | None) -> tuple[fx.GraphModule, torch.Tensor]:
    """x -> a = x * 2; b = a + x; c = sum(a) (a read by two steps); out = b * c; and with
    `extra` a node no program step takes: a Python function ("python", relu of out) or an op
    returning Tensor[] ("split", its first part an output)."""
    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(aten.mul.Tensor, (x, 2.0))
    b = graph.call_function(aten.add.Tensor, (a, x))
    c = graph.call_function(aten.sum.default, (a,))
    out = graph.call_function(aten.mul.Tensor, (b, c))
    outputs = [out]
    if extra == "python":
        outputs = [graph.call_function(torch.relu, (out,))]
    elif extra == "split":
        split = graph.call_function(aten.split.Tensor, (x, 2))
        outputs.append(graph.call_function(operator.getitem, (split, 0)))
    graph.output(tuple(outputs))
    return fx.GraphModule({}, graph), torch.arange(6.0).view(3, 2)


@pytest.mark.parametrize("extra", [None, "python", "split"])
def test_hand_made_programs_and_the_fallback(extra):
    """Boxed ATen steps with a result read by two later steps, replayed on new input contents;
    a Python function or a Tensor[] result leaves the whole program to the trace."""
    gm, x = _hand_made(extra)
    with torch.inference_mode():
        graph = CpuGraph.capture(gm, (x,))
        assert (graph.program is None) == (extra is not None)
        assert (graph.traced is None) == (extra is None)
        if graph.program is not None:
            assert graph.program.step_names() == ["aten::mul.Tensor", "aten::add.Tensor",
                                                  "aten::sum", "aten::mul.Tensor"]  # fmt: skip
        for scale in (1.0, -2.0):
            x.copy_(torch.arange(6.0).view(3, 2) * scale)
            got = graph.replay()
            want = (3 * x) * (2 * x).sum()
            assert torch.equal(got[0], want.relu() if extra == "python" else want)
            if extra == "split":
                assert torch.equal(got[1], x[:2])


def test_a_slot_read_twice_and_static_outputs():
    aten = torch.ops.aten
    graph = fx.Graph()
    x = graph.placeholder("x")
    buf = graph.get_attr("buf")
    a = graph.call_function(aten.mul.Tensor, (x, 2.0))
    b = graph.call_function(aten.add.Tensor, (a, x))
    c = graph.call_function(aten.sum.default, (a,))
    w = graph.call_function(aten.mul.out, (b, c), {"out": buf})  # static result: the buffer
    idx = graph.call_function(aten.index.Tensor, (x, [graph.placeholder("i")]))  # Tensor?[]
    graph.output((w, idx, c))
    gm = fx.GraphModule({"buf": torch.empty(3, 2)}, graph)
    gm.__dict__["buf"] = gm._buffers.pop("buf")
    x, i = torch.arange(6.0).view(3, 2), torch.tensor([2, 0])
    with torch.inference_mode():
        graph_ = CpuGraph.capture(gm, (x, i))
        assert graph_.program is not None and graph_.program.num_steps() == 5
        for scale in (1.0, 3.0):
            x.copy_(torch.arange(6.0).view(3, 2) * scale)
            out, rows, total = graph_.replay()
            assert out.data_ptr() == gm.buf.data_ptr()  # the .out result is the buffer itself
            assert torch.equal(out, (3 * x) * (2 * x).sum())
            assert torch.equal(rows, x[[2, 0]]) and torch.equal(total, (2 * x).sum())


def test_malformed_steps_are_refused():
    program = torch.classes.xllm.CpuProgram()
    with pytest.raises(RuntimeError, match="no operator"):
        program.add_step("xllm::no_such_op", "", [], [], [], [], [])
    with pytest.raises(RuntimeError, match="takes 3 arguments, given 1"):
        program.add_step("aten::add", "Tensor", [torch.ones(1)], [], [], [-1], [])
    with pytest.raises(RuntimeError, match="bad slot"):
        program.add_step("aten::neg", "", [None], [0], [5], [-1], [])
