"""`xllm-compile ... --emit onnx`: the optimized program as an ONNX model that passes
onnx.checker and that onnxruntime runs step by step, carrying its KV cache from one step's
`kv_cache_out` to the next's `kv_cache`, to the runtime engine's logits (fp32 1e-4 relative) for
prefill and decode, one sequence and a ragged batch; the refusals are one line, before any
work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xllm_compile import program_format
from xllm_compile.artifact import open_artifact
from xllm_compile.runtime import load

from conftest import EXAMPLE, compile_cli, make_hf_model
from helpers import assert_one_line_error, prefill_then_decode, rel_err, run_cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

PROMPTS = ([1, 5, 9, 33, 7, 100, 3, 12, 44, 2, 8, 19], [4, 17, 250, 6, 31])
CONTINUATIONS = ([15, 27, 3], [8, 8, 140])


class OnnxSteps:
    """The exported model run as the runtime runs its program: a flat ragged batch of
    sequences, each in its own cache slot."""

    def __init__(self, art, num_slots: int = 4, max_len: int = 64) -> None:
        manifest = json.loads((art / "manifest.json").read_text())
        cfg = manifest["model"]["config"]
        self.sess = ort.InferenceSession(
            str(art / manifest["onnx"]["file"]), providers=["CPUExecutionProvider"]
        )
        dtype = {"float32": np.float32, "float16": np.float16}[manifest["dtype"]]
        shape = (cfg["num_layers"], 2, num_slots, max_len, cfg["num_kv_heads"], cfg["head_dim"])
        self.kv_cache = np.zeros(shape, dtype)

    def step(self, seqs: list[tuple[int, list[int], int]], all_logits: bool) -> torch.Tensor:
        """seqs: (slot, new tokens, tokens already cached) each; the logits of every new token
        (all_logits) or of each sequence's last."""
        ids, positions, token_slots, last, n = [], [], [], [], 0
        for slot, tokens, start in seqs:
            ids += tokens
            positions += range(start, start + len(tokens))
            token_slots += [slot] * len(tokens)
            n += len(tokens)
            last.append(n - 1)

        def i64(x):
            return np.asarray(list(x), np.int64)

        feeds = {
            "input_ids": i64(ids),
            "positions": i64(positions),
            "token_slots": i64(token_slots),
            "seq_slots": i64(s for s, _, _ in seqs),
            "query_lens": i64(len(t) for _, t, _ in seqs),
            "seq_lens": i64(c + len(t) for _, t, c in seqs),
            "logits_indices": i64(range(n)) if all_logits else i64(last),
            "kv_cache": self.kv_cache,
        }
        logits, self.kv_cache = self.sess.run(["logits", "kv_cache_out"], feeds)
        return torch.from_numpy(logits)


def check_against_engine(art, tol: float) -> None:
    engine = load(art)
    refs = [prefill_then_decode(engine, p, c) for p, c in zip(PROMPTS, CONTINUATIONS, strict=True)]
    # one sequence at a time, in slot 2: prefill every row, then one decode step per token
    steps = OnnxSteps(art)
    rows, done = [steps.step([(2, PROMPTS[0], 0)], all_logits=True)], len(PROMPTS[0])
    for token in CONTINUATIONS[0]:
        rows.append(steps.step([(2, [token], done)], all_logits=False))
        done += 1
    assert rel_err(torch.cat(rows), refs[0]) < tol
    # both sequences in every step (a ragged prefill, then batched decodes) in slots 3 and 0
    steps = OnnxSteps(art)
    out = steps.step([(3, PROMPTS[0], 0), (0, PROMPTS[1], 0)], all_logits=True)
    split = len(PROMPTS[0])
    assert rel_err(out[:split], refs[0][:split]) < tol
    assert rel_err(out[split:], refs[1][: len(PROMPTS[1])]) < tol
    done = [len(p) for p in PROMPTS]
    for i in range(len(CONTINUATIONS[0])):
        seqs = [(3, [CONTINUATIONS[0][i]], done[0]), (0, [CONTINUATIONS[1][i]], done[1])]
        out = steps.step(seqs, all_logits=False)
        for b in range(2):
            assert rel_err(out[b], refs[b][len(PROMPTS[b]) + i]) < tol
            done[b] += 1


def test_embedded_model_exports_a_checked_onnx_model_that_reproduces_the_logits(tmp_path):
    art = compile_cli(EXAMPLE, tmp_path / "art", "--emit", "onnx")
    manifest = json.loads((art / "manifest.json").read_text())
    entry = manifest["onnx"]
    assert {entry["file"], entry["data"]} <= set(manifest["files"])  # hashed like every file
    onnx.checker.check_model(str(art / entry["file"]), full_check=True)
    model = onnx.load(str(art / entry["file"]), load_external_data=False)
    # the xllm:: ops the program calls are function calls, each with its body in the model
    program = program_format.loads((art / "program.json").read_bytes())
    program_ops = {
        n.target._schema.name.split("::")[1]
        for n in program.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "xllm"
    }
    called = {n.op_type for n in model.graph.node if n.domain == "xllm"}
    assert called == program_ops == set(entry["functions"])
    assert {f.name for f in model.functions} == called
    assert all(len(f.node) > 1 for f in model.functions if f.name != "linear")
    assert [o.name for o in model.graph.output] == ["logits", "kv_cache_out"]
    assert len(model.graph.initializer) == len(manifest["program"]["params"])
    check_against_engine(art, tol=1e-4)
    assert load(art).generate([[1, 2, 3]], max_tokens=2)  # the artifact still serves


@pytest.mark.parametrize(
    "family, extra, tol",
    [
        ("mistral", (), 1e-4),  # a sliding window shorter than the prompts
        ("qwen2", ("--passes", "none"), 1e-4),  # q/k/v bias; the unfused ATen program
        ("qwen3", ("--dtype", "float16"), 1e-2),  # q/k norms; fp16 (the dtype's tolerance)
    ],
)
def test_families_export(tmp_path, family, extra, tol):
    make_hf_model(family, tmp_path / "hf")
    art = compile_cli(tmp_path / "hf", tmp_path / "art", "--emit", "onnx", *extra)
    onnx.checker.check_model(str(art / "model.onnx"), full_check=True)
    check_against_engine(art, tol)


def test_refusals_are_one_line_before_any_work(tmp_path):
    out = tmp_path / "art"
    proc = run_cli("compile", str(EXAMPLE), "--out", str(out), "--emit", "onnx", "--tp", "2")
    assert_one_line_error(proc, "--emit onnx", "--tp 1")
    proc = run_cli("compile", str(EXAMPLE), "--out", str(out), "--emit", "onnx", "--quant", "q8_0")
    assert_one_line_error(proc, "--emit onnx", "--quant none")
    proc = run_cli("compile", str(EXAMPLE), "--out", str(out), "--emit", "tflite")
    assert proc.returncode == 2 and "--emit" in proc.stderr
    assert not out.exists()


def test_a_compile_killed_while_exporting_leaves_the_old_artifact(tmp_path):
    from test_compile_atomic import compile_proc

    out = compile_cli(EXAMPLE, tmp_path / "art", "--passes", "none")
    proc = compile_proc(EXAMPLE, out, "--emit", "onnx", kill_at="onnx")
    assert proc.returncode == -9, proc.stderr
    manifest = open_artifact(out).manifest  # complete, every hash right: the old one
    assert manifest["passes"] == [] and manifest.get("onnx") is None
    assert not (out / "model.onnx").exists()
