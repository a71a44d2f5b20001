"""Writing small GGUF files the way llama.cpp's convert_hf_to_gguf.py does (permuted q/k rows,
F32 norms, F16 / Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K matrices, a byte-level BPE tokenizer in the
metadata), from a random-weight transformers Llama/Qwen model and a tiny BPE tokenizer trained
here on fixed text. gguf-py quantizes Q8_0/Q4_0/Q4_1; the K-quants are written by the simple
quantizers below (valid blocks of ggml's layout, not llama.cpp's error-minimizing choices)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. In 1811, 42 families lived there; the 3 sisters read 17 letters. "
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(vocab_size: int):
    """A deterministic byte-level BPE (GPT-2 split) with `vocab_size` tokens, 3 of them special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def _vocab(tok) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges as "a b")."""
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    types = [3 if t in SPECIAL else 1 for t in tokens]  # 3 = CONTROL, 1 = NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in torch."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _add_metadata(writer: gguf.GGUFWriter, cfg, tok, chat_template: str = CHAT_TEMPLATE) -> None:
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if tok is not None:
        tokens, types, merges = _vocab(tok)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_chat_template(chat_template)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks [N, K / 256 * 144] of x [N, K]: 8 sub-blocks of 32 with 6-bit scale and min."""
    n = x.shape[0]
    sb = x.astype(np.float32).reshape(n, -1, 8, 32)
    lo, hi = np.minimum(sb.min(-1), 0), sb.max(-1)
    scale = (hi - lo) / 15  # [n, nb, 8]
    d = scale.max(-1, keepdims=True) / 63
    dmin = (-lo).max(-1, keepdims=True) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / np.where(dmin > 0, dmin, 1)), 0, 63).astype(np.uint8)
    eff_d = d16.astype(np.float32) * sc
    eff_m = dmin16.astype(np.float32) * mn
    q = np.round((sb + eff_m[..., None]) / np.where(eff_d > 0, eff_d, 1)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, -1, 4, 2, 32)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n, -1, 128)
    scales = np.zeros((n, sc.shape[1], 12), np.uint8)
    scales[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    scales[..., 4:8] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    head = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8)], -1)
    return np.concatenate([head, scales, qs], -1).reshape(n, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks [N, K / 256 * 210] of x [N, K]: 16 sub-blocks of 16 with int8 scales."""
    n = x.shape[0]
    sb = x.astype(np.float32).reshape(n, -1, 16, 16)
    amax = np.abs(sb).max(-1)  # [n, nb, 16]
    d = (amax / 32).max(-1, keepdims=True) / 127
    d16 = d.astype(np.float16)
    sc = np.clip(np.round(amax / 32 / np.where(d > 0, d, 1)), -128, 127).astype(np.int8)
    eff = d16.astype(np.float32) * sc
    q = np.clip(np.round(sb / np.where(eff > 0, eff, 1)[..., None]), -32, 31) + 32
    q = q.astype(np.uint8).reshape(n, -1, 2, 4, 32)  # [.., half, quarter, l]
    ql = np.concatenate(
        [
            q[..., 0, :] & 0xF | ((q[..., 2, :] & 0xF) << 4),
            q[..., 1, :] & 0xF | ((q[..., 3, :] & 0xF) << 4),
        ],
        -1,
    ).reshape(n, -1, 128)
    qh = (
        (q[..., 0, :] >> 4)
        | ((q[..., 1, :] >> 4) << 2)
        | ((q[..., 2, :] >> 4) << 4)
        | ((q[..., 3, :] >> 4) << 6)
    ).reshape(n, -1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8)], -1).reshape(n, -1)


K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}


def _tensor(name: str, w: torch.Tensor, cfg, qtype: str) -> tuple[np.ndarray, object]:
    permuted = cfg.model_type == "llama"  # llama.cpp permutes q/k for Llama, not for Qwen2/3
    if permuted and ".attn_q." in name:
        w = llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
    elif permuted and ".attn_k." in name:
        w = llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
    data = w.float().numpy()
    if data.ndim == 1:  # norms stay F32, as llama.cpp keeps them
        return data, None
    if qtype == "F16":
        return data.astype(np.float16), None
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype in K_QUANTIZERS:
        return K_QUANTIZERS[qtype](data), kind
    return gguf.quants.quantize(data, kind), kind


def write_gguf(
    path: Path,
    model,
    tok,
    qtype: str = "F16",
    chat_template: str = CHAT_TEMPLATE,
    overrides: dict[str, str] | None = None,
) -> Path:
    """Write `model` (a transformers Llama/Qwen2/Qwen3 CausalLM) as llama.cpp would, its
    matrices as `qtype`; `overrides`: a type per tensor kind ("attn_v": "Q6_K", as Q4_K_M)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), cfg.model_type)
    _add_metadata(writer, cfg, tok, chat_template)
    arch = getattr(gguf.MODEL_ARCH, cfg.model_type.upper())
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for hf_name, w in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied model has no `output` tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        kind = name.split(".")[-2]
        data, raw_dtype = _tensor(name, w, cfg, (overrides or {}).get(kind, qtype))
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    _finish(writer)
    return path


def write_raw_gguf(path: Path, arch: str, meta: dict, tensors: dict) -> Path:
    """A GGUF with the given metadata (uint32/str/float values) and raw tensors:
    name -> (numpy array, raw ggml type or None)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
