"""Low-bit weights (`--quant`): a GGUF's own blocks kept as they are (Q8_0 / Q4_0 / Q4_1 / Q4_K,
and Q4_K with Q6_K v projections as llama.cpp's Q4_K_M) hold exactly the numbers transformers'
GGUF loader dequantizes and give its logits and greedy tokens; HF models quantized here (int8 /
int4 / q4_0 / q4_1) keep the embedded model's perplexity; the pass log's bytes; refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from xllm_compile.artifact import MANIFEST
from xllm_compile.kernels.linear_q import FORMATS, dequantize
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

PAIRS = {  # merged program weight -> the HF weights it concatenates
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attn.o_proj": ["self_attn.o_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down_proj": ["mlp.down_proj"],
}


def _stored(got: dict, name: str) -> torch.Tensor | None:
    """The fp32 weight an artifact's quantized tensor `name.<qtype>` stands for, if any."""
    for key, t in got.items():
        qtype = key[len(name) + 1 :]
        if key.startswith(name + ".") and qtype in FORMATS:
            return dequantize(t, qtype)
    return None


@pytest.mark.parametrize(
    ("qtype", "overrides", "hidden"),
    [
        ("Q8_0", None, 64),
        ("Q4_0", None, 64),
        ("Q4_1", None, 64),
        ("Q4_K", None, 256),
        ("Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K"}, 256),
    ],
)
def test_gguf_blocks_kept_as_they_are(qtype, overrides, hidden, tmp_path):
    """A GGUF compiled with the default --quant (keep): every matmul computes, bit for bit, the
    weight transformers' GGUF loader dequantizes; logits within 1e-3 of transformers on them and
    32 greedy tokens the same."""
    from frontend.gguf_helpers import write_gguf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from conftest import BASE

    shape = {"hidden_size": hidden, "intermediate_size": 2 * hidden if hidden == 256 else 160}
    config = LlamaConfig(**{**BASE, **shape, "tie_word_embeddings": qtype == "Q4_1"})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = write_gguf(tmp_path / "m.gguf", model, None, qtype, overrides=overrides)
    art = compile_cli(path, tmp_path / "art")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    want = ref.eval().state_dict()
    got = load_file(str(art / "weights.safetensors"))
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for merged, parts in PAIRS.items():
            mine = _stored(got, p + merged + ".weight")
            if mine is None:  # kept apart: differently stored siblings (Q4_K_M's v)
                for part in parts:
                    mine = _stored(got, p + part + ".weight")
                    assert torch.equal(mine, want[p + part + ".weight"]), p + part
                continue
            theirs = torch.cat([want[p + part + ".weight"] for part in parts])
            assert torch.equal(mine, theirs), p + merged
    assert torch.equal(_stored(got, "lm_head.weight"), want["lm_head.weight"])
    manifest = json.loads((art / MANIFEST).read_text())
    assert manifest["quant"]["mode"] == "keep"
    [record] = [r for r in manifest["passes"] if r["name"] == "quantize"]
    assert record["stats"]["matches"] >= (3 if overrides else 4) * config.num_hidden_layers + 1
    if overrides:
        assert any("q6_k" in k for k in record["stats"]["replaced"]), record["stats"]
    prompt = [1, 17, 93, 250, 4, 61, 77, 300, 12, 45]
    continuation = hf_greedy(ref, prompt, 32)
    engine = load(art)
    [done] = engine.generate([prompt], max_tokens=32, ignore_eos=True)
    assert done.token_ids == continuation
    ours = prefill_then_decode(engine, prompt, continuation[:8])
    assert rel_err(ours, hf_logits(ref, prompt + continuation[:8])) < 1e-3


def test_gguf_quant_none_dequantizes(tmp_path):
    """--quant none on a GGUF: the float artifact of before (no quantize pass, no blocks)."""
    from frontend.gguf_helpers import write_gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import BASE

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BASE)).eval()
    path = write_gguf(tmp_path / "m.gguf", model, None, "Q8_0")
    art = compile_cli(path, tmp_path / "art", "--quant", "none")
    got = load_file(str(art / "weights.safetensors"))
    assert not any(k.endswith(".q8_0") for k in got)
    assert json.loads((art / MANIFEST).read_text())["quant"] is None


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
        mode: compile_cli(
            EXAMPLE,
            root / mode,
            "--dtype",
            "bfloat16",
            *(() if mode == "none" else ("--quant", mode)),
        )
        for mode in ("none", "q8_0", "int8", "q4_0", "q4_1", "int4")
    }


# (perplexity allowed above the bf16 artifact's, weight bytes at most this share of bf16's)
BOUNDS = {
    "q8_0": (0.01, 0.56),
    "int8": (0.01, 0.56),
    "q4_0": (0.05, 0.40),
    "q4_1": (0.05, 0.40),
    "int4": (0.05, 0.40),
}


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_embedded_model_perplexity(mode, embedded):
    """8-bit within 1% of the bf16 artifact's perplexity on held-out text, 4-bit within 5%."""
    allowed, share = BOUNDS[mode]
    base, quant = _perplexity(embedded["none"]), _perplexity(embedded[mode])
    assert abs(quant / base - 1) < allowed, (base, quant)
    manifest = json.loads((embedded[mode] / MANIFEST).read_text())
    [record] = [p for p in manifest["passes"] if p["name"] == "quantize"]
    stats = record["stats"]
    layers = manifest["model"]["config"]["num_layers"]
    assert stats["matches"] >= 4 * layers  # qkv, o, gate_up, down of every layer
    details = stats["details"]
    assert details["weight_bytes_after"] < share * details["weight_bytes_before"], details
    assert manifest["quant"]["mode"] == mode
    size = lambda art: (art / "weights.safetensors").stat().st_size  # noqa: E731
    assert size(embedded[mode]) < size(embedded["none"])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--quant", "fp4"), "choose one of auto, none, keep"),
        (("--quant", "keep"), "keeps a GGUF's quantized blocks"),
        (("--quant", "q4_0", "--device", "cuda"), "no quantized-matmul kernel for cuda"),
        (("--quant", "int4", "--tp", "2"), "not implemented yet"),
    ],
)
def test_unsupported_modes_are_refused(extra, needle, tmp_path):
    proc = run_cli("compile", str(EXAMPLE), "--out", str(tmp_path / "a"), *extra)
    assert_one_line_error(proc, "--quant", needle)
