"""GGUF import: small GGUF files written here as llama.cpp would (F16 and Q8_0), converted to an HF
folder, compiled through the CLI, and compared with transformers' own GGUF loader. No network."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import (
    CHAT_TEMPLATE,
    TEXT,
    llama_cpp_permute,
    train_tokenizer,
    write_gguf,
    write_raw_gguf,
)
from safetensors.torch import load_file

from xllm_compile.errors import ConfigError, UnsupportedModelError, WeightError
from xllm_compile.gguf import gguf_to_hf_folder, unpermute_qk
from xllm_compile.runtime import load
from xllm_compile.runtime.tokenizer import Tokenizer

from conftest import BASE, FAMILIES, compile_cli
from helpers import hf_greedy, hf_logits, prefill_then_decode, rel_err

# F16 with untied embeddings (written in small shards), Q8_0 with tied embeddings and no tokenizer
VARIANTS = {"f16": ("F16", False, True), "q8_0": ("Q8_0", True, False)}


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**BASE, "tie_word_embeddings": tied})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """variant -> (HF model, gguf path, converted folder, artifact, transformers' GGUF model)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(variant: str):
        if variant not in cache:
            qtype, tied, with_tokenizer = VARIANTS[variant]
            root = tmp_path_factory.mktemp(f"gguf-{variant}")
            model = _llama(tied)
            tok = train_tokenizer(model.config.vocab_size) if with_tokenizer else None
            path = write_gguf(root / f"tiny-{variant}.gguf", model, tok, qtype)
            shard = 64 << 10 if variant == "f16" else 256 << 20  # f16: exercise the index
            hf_dir = gguf_to_hf_folder(path, root / "hf", show_progress=False, shard_bytes=shard)
            art = compile_cli(hf_dir, root / "art")
            ref = AutoModelForCausalLM.from_pretrained(
                root, gguf_file=path.name, dtype=torch.float32
            )
            cache[variant] = (model, path, hf_dir, art, ref.eval())
        return cache[variant]

    return get


PROMPT = [1, 17, 93, 250, 4, 61, 77, 300, 12, 45, 201, 9]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_gguf_loader(variant, gguf_models):
    _, _, _, art, ref = gguf_models(variant)
    continuation = hf_greedy(ref, PROMPT, 20)
    expected = hf_logits(ref, PROMPT + continuation)
    out = prefill_then_decode(load(art), PROMPT, continuation)
    assert rel_err(out[: len(PROMPT)], expected[: len(PROMPT)]) < 1e-4  # prefill
    assert rel_err(out[len(PROMPT) :], expected[len(PROMPT) :]) < 1e-4  # 20 decode steps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers_gguf_loader(variant, gguf_models):
    _, _, _, art, ref = gguf_models(variant)
    [result] = load(art).generate([PROMPT], max_tokens=32, ignore_eos=True)
    assert result.token_ids == hf_greedy(ref, PROMPT, 32)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_match_the_original_model(family, tmp_path):
    """Qwen2 (q/k/v bias, tied) and Qwen3 (q/k norm, head_dim != hidden/heads) GGUFs, not
    permuted by llama.cpp. transformers' GGUF loader drops Qwen3's head_dim, so the reference
    is the original model, its weights rounded to fp16 first so that F16 storage is lossless."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**BASE, **extra))
    for p in model.parameters():
        p.data = p.data.half().float()
    path = write_gguf(tmp_path / f"{family}.gguf", model.eval(), None, "F16")
    art = compile_cli(gguf_to_hf_folder(path, tmp_path / "hf", show_progress=False), tmp_path / "a")
    continuation = hf_greedy(model, PROMPT, 16)
    out = prefill_then_decode(load(art), PROMPT, continuation)
    assert rel_err(out, hf_logits(model, PROMPT + continuation)) < 1e-4
    [result] = load(art).generate([PROMPT], max_tokens=16, ignore_eos=True)
    assert result.token_ids == continuation


def test_f16_weights_are_the_original_ones_unpermuted(gguf_models):
    """q/k rows come back in HF order: equal to the original weights rounded to fp16."""
    model, _, hf_dir, _, _ = gguf_models("f16")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # written as several shards
    ours = {}
    for shard in sorted(set(index["weight_map"].values())):
        ours.update(load_file(hf_dir / shard))
    original = model.state_dict()
    assert set(ours) == set(original)
    for name, w in original.items():
        assert torch.equal(ours[name], w.half().float() if w.dim() == 2 else w), name


def test_q8_0_is_tied_and_config_matches(gguf_models):
    model, _, hf_dir, _, _ = gguf_models("q8_0")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(hf_dir / "model.safetensors")
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "num_hidden_layers"):
        assert config[key] == getattr(model.config, key), key
    assert not (hf_dir / "tokenizer.json").exists()  # that file had no tokenizer


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, 4, 4), 4), w)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w[:16], 4, 2), 2), w[:16])
    b = torch.randn(32)
    assert torch.equal(unpermute_qk(llama_cpp_permute(b, 4, 4), 4), b)


def test_tokenizer_matches_trained_and_transformers(gguf_models):
    from transformers import AutoTokenizer

    _, path, hf_dir, art, _ = gguf_models("f16")
    trained = train_tokenizer(BASE["vocab_size"])
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer(art, ["tokenizer.json", "tokenizer_config.json"])
    for text in [TEXT[:120], "In 1811, 42 families<|im_end|> lived", " two  spaces\nnew line"]:
        ids = ours.encode(text)
        assert ids == trained.encode(text).ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text.replace("<|im_end|>", "")  # special tokens are skipped
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["chat_template"] == CHAT_TEMPLATE
    chat = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2


# --- bad input: each a one-line XllmError naming the problem ---------------------------------


def _one_line(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("keep", [0.6, 0.98, 200 / 10**6])
def test_truncated_gguf(gguf_models, tmp_path, keep):
    _, path, _, _, _ = gguf_models("f16")
    data = path.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: max(64, int(len(data) * keep))])
    with pytest.raises(WeightError) as excinfo:
        gguf_to_hf_folder(bad, tmp_path / "out", show_progress=False)
    _one_line(excinfo, "truncated.gguf", "truncated or corrupt")


def test_not_a_gguf_and_missing_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(WeightError) as excinfo:
        gguf_to_hf_folder(bad, tmp_path / "out", show_progress=False)
    _one_line(excinfo, "not a GGUF file")
    with pytest.raises(ConfigError) as excinfo:
        gguf_to_hf_folder(tmp_path / "missing.gguf", tmp_path / "out", show_progress=False)
    _one_line(excinfo, "not found")


def test_unknown_architecture(tmp_path):
    tensors = {"token_embd.weight": (np.zeros((8, 4), np.float32), None)}
    path = write_raw_gguf(tmp_path / "bert.gguf", "bert", {"bert.block_count": 1}, tensors)
    with pytest.raises(UnsupportedModelError) as excinfo:
        gguf_to_hf_folder(path, tmp_path / "out", show_progress=False)
    _one_line(excinfo, "'bert'", "llama")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_block_count_beyond_the_tensors_is_one_line(tmp_path):
    """A GGUF claiming 100k layers with tensors for one: refused at once (it used to run for
    minutes growing memory)."""
    tensors = {
        "token_embd.weight": (np.zeros((8, 4), np.float32), None),
        "blk.0.attn_q.weight": (np.zeros((4, 4), np.float32), None),
    }
    meta = {"llama.block_count": 100_000}
    path = write_raw_gguf(tmp_path / "big.gguf", "llama", meta, tensors)
    with pytest.raises(WeightError) as excinfo:
        gguf_to_hf_folder(path, tmp_path / "out", show_progress=False)
    _one_line(excinfo, "block_count=100000", "1 layers")


def test_unsupported_quant_type(tmp_path):
    q8_1 = gguf.GGMLQuantizationType.Q8_1  # llama.cpp uses it for activations only
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[q8_1]
    raw = np.zeros((8, 64 // block_elems * block_bytes), np.uint8)  # [8, 64] as Q8_1 blocks
    tensors = {"token_embd.weight": (raw, q8_1)}
    path = write_raw_gguf(tmp_path / "q8_1.gguf", "llama", {"llama.block_count": 1}, tensors)
    with pytest.raises(UnsupportedModelError) as excinfo:
        gguf_to_hf_folder(path, tmp_path / "out", show_progress=False)
    _one_line(excinfo, "Q8_1", "token_embd.weight")


def test_cli_compiles_a_gguf_file_directly(gguf_models, tmp_path):
    """`xllm-compile FILE.gguf --out ART --quant none` gives the same artifact weights as the
    HF-folder path; the default (--quant keep) stores the GGUF's Q8_0 blocks instead."""
    _, path, _, art, _ = gguf_models("q8_0")
    direct = compile_cli(path, tmp_path / "direct", "--quant", "none")
    a, b = load_file(art / "weights.safetensors"), load_file(direct / "weights.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    kept = load_file(compile_cli(path, tmp_path / "kept") / "weights.safetensors")
    assert any(k.endswith(".q8_0") for k in kept) and not any(k.endswith(".q8_0") for k in a)
    assert not list(tmp_path.glob(".*gguf-*"))  # the temporary HF folder is gone


def test_cli_bad_gguf_is_one_line_exit_2(gguf_models, tmp_path):
    import subprocess
    import sys

    _, path, _, _, _ = gguf_models("f16")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    proc = subprocess.run(
        [sys.executable, "-m", "xllm_compile", "compile", str(bad), "--out", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "cut.gguf" in lines[0], proc.stderr


def test_gguf_template_payload(tmp_path):
    """A GGUF's tokenizer.chat_template is untrusted: it renders in the sandbox."""
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    model = _llama(tied=True)
    tok = train_tokenizer(BASE["vocab_size"])
    payload = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    path = write_gguf(tmp_path / "evil.gguf", model, tok, chat_template=payload)
    art = compile_cli(path, tmp_path / "art")
    cmd = [sys.executable, "-m", "xllm_compile", "generate", str(art), "--chat", "hello"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "chat template" in proc.stderr
    assert not marker.exists()
