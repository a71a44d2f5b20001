"""Weight-only int8 (`--quant q8_0 | int8`): the op against dequantize-then-matmul, a Q8_0 GGUF
compiled with --quant q8_0 holding exactly the numbers transformers' GGUF loader dequantizes
(and its logits and greedy tokens), the embedded model's perplexity within 1% of the float
artifact's, the pass log's bytes, and the modes that are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from xllm_compile.artifact import MANIFEST
from xllm_compile.kernels.linear_q8 import dequantize, linear_q8_ref
from xllm_compile.passes.quantize import quantize_weight
from xllm_compile.runtime import load
from xllm_compile.runtime.tokenizer import Tokenizer

from conftest import EXAMPLE, compile_cli
from helpers import (
    assert_one_line_error,
    hf_greedy,
    hf_logits,
    prefill_then_decode,
    rel_err,
    run_cli,
)


@pytest.mark.parametrize("mode", ["q8_0", "int8"])
@pytest.mark.parametrize("shape", [(1, 64, 32), (5, 96, 64), (17, 160, 33)])
def test_op_is_dequantize_then_matmul(mode, shape):
    rows, k, n = shape
    torch.manual_seed(rows)
    w, x, b = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)
    q, s = quantize_weight(w, mode)
    assert q.dtype == torch.int8 and s.shape == (n, k // 32 if mode == "q8_0" else 1)
    y = torch.ops.xllm.linear_q8(x, q, s, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, dequantize(q, s), b))
    torch.testing.assert_close(y, linear_q8_ref(x, q, s, b))
    # the quantization itself: every value within half a step of its group's scale
    step = s.float().repeat_interleave(k // s.shape[1], dim=1)
    assert ((dequantize(q, s) - w).abs() <= step / 2 + 1e-6).all()


def test_q8_0_gguf_holds_the_gguf_numbers(tmp_path):
    """A Q8_0 GGUF (written with gguf-py's quantizer, as llama.cpp's) compiled with --quant
    q8_0: every matmul's dequantized weight equals, bit for bit, what transformers' GGUF loader
    dequantizes; logits within 1e-3 and 32 greedy tokens the same."""
    from frontend.gguf_helpers import write_gguf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from conftest import BASE

    config = LlamaConfig(**{**BASE, "tie_word_embeddings": False})
    torch.manual_seed(0)
    path = write_gguf(tmp_path / "m.gguf", LlamaForCausalLM(config).eval(), None, "Q8_0")
    art = compile_cli(path, tmp_path / "art", "--quant", "q8_0")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    want = ref.eval().state_dict()
    got = load_file(str(art / "weights.safetensors"))
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        pairs = {
            "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "self_attn.o_proj": ["self_attn.o_proj"],
            "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
            "mlp.down_proj": ["mlp.down_proj"],
        }
        for merged, parts in pairs.items():
            name = p + merged + ".weight"
            mine = dequantize(got[name + ".qweight"], got[name + ".scales"])
            theirs = torch.cat([want[p + part + ".weight"] for part in parts])
            assert torch.equal(mine, theirs), name
    assert torch.equal(
        dequantize(got["lm_head.weight.qweight"], got["lm_head.weight.scales"]),
        want["lm_head.weight"],
    )
    prompt = [1, 17, 93, 250, 4, 61, 77, 300, 12, 45]
    continuation = hf_greedy(ref, prompt, 32)
    engine = load(art)
    [done] = engine.generate([prompt], max_tokens=32, ignore_eos=True)
    assert done.token_ids == continuation
    ours = prefill_then_decode(engine, prompt, continuation[:8])
    assert rel_err(ours, hf_logits(ref, prompt + continuation[:8])) < 1e-3


HELD_OUT = (
    "The old man sat by the window and watched the rain fall on the garden. He had not spoken "
    "to anyone for three days, and the silence of the house pressed upon him like a heavy coat. "
    "When the knock came at last, he rose slowly and went to the door, wondering who would come "
    "so far on such a night."
)


def _perplexity(art) -> float:
    engine = load(art)
    ids = Tokenizer(EXAMPLE, ["tokenizer.json", "tokenizer_config.json"]).encode(HELD_OUT)
    logits = prefill_then_decode(engine, ids[:1], ids[1:-1])  # [len - 1, V]: next-token logits
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]))
    return math.exp(nll.item())


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {
        mode: compile_cli(EXAMPLE, root / mode, *(() if mode == "none" else ("--quant", mode)))
        for mode in ("none", "q8_0", "int8")
    }


@pytest.mark.parametrize("mode", ["q8_0", "int8"])
def test_embedded_model_perplexity_within_1_percent(mode, embedded):
    base, quant = _perplexity(embedded["none"]), _perplexity(embedded[mode])
    assert abs(quant / base - 1) < 0.01, (base, quant)
    manifest = json.loads((embedded[mode] / MANIFEST).read_text())
    [record] = [p for p in manifest["passes"] if p["name"] == "quantize"]
    stats = record["stats"]
    layers = manifest["model"]["config"]["num_layers"]
    assert stats["matches"] >= 4 * layers  # qkv, o, gate_up, down of every layer
    assert stats["details"]["weight_bytes_after"] < stats["details"]["weight_bytes_before"] / 3.5
    assert manifest["quant"]["mode"] == mode
    size = lambda art: (art / "weights.safetensors").stat().st_size  # noqa: E731
    assert size(embedded[mode]) < size(embedded["none"])


@pytest.mark.parametrize(
    ("mode", "needle"),
    [
        ("q4_0", "4-bit weights are not implemented"),
        ("keep", "not implemented yet"),
        ("fp4", "choose one of none, q8_0, int8"),
    ],
)
def test_unsupported_modes_are_refused(mode, needle, tmp_path):
    proc = run_cli("compile", str(EXAMPLE), "--out", str(tmp_path / "a"), "--quant", mode)
    assert_one_line_error(proc, "--quant", needle)
