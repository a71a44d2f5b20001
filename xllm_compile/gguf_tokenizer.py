"""The tokenizer of a GGUF file, rebuilt as HF tokenizer files (tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json) from its metadata.

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama 3, Qwen) is built here with the
`tokenizers` library, the split regex chosen by `tokenizer.ggml.pre` as llama.cpp's llama-vocab.cpp
does. Other tokenizer models (sentencepiece "llama", ...) go through transformers' GGUF converter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from xllm_compile.errors import UnsupportedModelError, WeightError

log = logging.getLogger(__name__)

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regex, digits one by one first). "smollm"/"starcoder" split every
# digit before the GPT-2 regex, as their tokenizer.json's Digits(individual_digits) does.
PRE_TOKENIZERS = {
    "default": (GPT2_SPLIT, False),
    "gpt2": (GPT2_SPLIT, False),
    "smollm": (GPT2_SPLIT, True),
    "starcoder": (GPT2_SPLIT, True),
    "llama-bpe": (LLAMA3_SPLIT, False),
    "llama3": (LLAMA3_SPLIT, False),
    "smaug-bpe": (LLAMA3_SPLIT, False),
    "qwen2": (QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (QWEN2_SPLIT, False),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def write_tokenizer(meta: dict[str, Any], out_dir: Path, gguf_path: Path) -> list[str]:
    """Write the tokenizer files into `out_dir`; returns their names ([] when the file has none).

    Raises:
        UnsupportedModelError: a tokenizer model this build cannot convert.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        log.warning("%s has no tokenizer; the artifact will take token ids only", gguf_path.name)
        return []
    tokenizer = byte_level_bpe(meta) if kind == "gpt2" else _converted(gguf_path, kind)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta))
    _write_json(out_dir / "generation_config.json", generation_config(meta))
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def byte_level_bpe(meta: dict[str, Any]):
    """A `tokenizers.Tokenizer` for a GGUF byte-level BPE vocabulary (tokens + merges)."""
    from tokenizers import Tokenizer, decoders, models

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise WeightError("GGUF tokenizer: token_type and tokens have different lengths")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {token: i for i, token in reversed(list(enumerate(tokens)))}  # first id wins
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta, tokens)
    _add_special_tokens(tok, tokens, types)
    return tok


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZERS:
        log.warning("GGUF pre-tokenizer %r is not known here; splitting text as GPT-2 does", pre)
    split, digits = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == GPT2_SPLIT:  # ByteLevel's built-in regex is exactly GPT-2's
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _post_processor(meta: dict[str, Any], tokens: list[str]):
    """BOS/EOS added on encode when the file asks for it (`add_bos_token`, Llama 3 does)."""
    from tokenizers import processors

    special, single = [], "$A"
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        special.append((tokens[bos], bos))
        single = f"{tokens[bos]} {single}"
    if meta.get("tokenizer.ggml.add_eos_token") and eos is not None:
        special.append((tokens[eos], eos))
        single = f"{single} {tokens[eos]}"
    if not special:
        return processors.ByteLevel(trim_offsets=False)
    return processors.TemplateProcessing(single=single, special_tokens=special)


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Control tokens (`<|im_start|>`) become special added tokens and user-defined ones plain
    added tokens, so both are matched whole in text instead of being cut into pieces. Their
    ids come from the vocabulary, which already holds them."""
    from tokenizers import AddedToken

    control = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL]
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _converted(gguf_path: Path, kind: str):
    """Any other tokenizer model through transformers' GGUF converter (compile time only)."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} needs transformers to convert it (pip install "
            "transformers); only 'gpt2' (byte-level BPE) is built without it"
        ) from None
    try:
        arch, tokenizer_dict, _ = get_gguf_tokenizer(str(gguf_path))
        backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r}: cannot convert ({e})"
        ) from None
    return backend


def eos_token_ids(meta: dict[str, Any]) -> int | list[int] | None:
    """The eos id, plus the end-of-turn id when the file names a different one (chat models)."""
    ids = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else (ids or None)


def _token(meta: dict[str, Any], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: special tokens, BOS/EOS flags and the chat template."""
    arch = meta.get("general.architecture")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, "bos_token_id"),
        "eos_token": _token(meta, "eos_token_id"),
        "unk_token": _token(meta, "unknown_token_id"),
        "pad_token": _token(meta, "padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length", 4096)),
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    config = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_token_ids(meta),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return {k: v for k, v in config.items() if v is not None}
