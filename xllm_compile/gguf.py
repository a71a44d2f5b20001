"""GGUF import: a llama.cpp GGUF file -> a Hugging Face-style model folder (config.json, sharded
safetensors, tokenizer files) that `xllm-compile` then compiles like any other folder.

References: transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`, `integrations/ggml.py`)
and llama.cpp's `convert_hf_to_gguf.py`, whose Q/K row permutation is undone here.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xllm_compile.errors import ConfigError, UnsupportedModelError, WeightError
from xllm_compile.gguf_tokenizer import eos_token_ids, write_tokenizer
from xllm_compile.hf import save_safetensors
from xllm_compile.kernels.linear_q import FORMATS, GGUF_TYPES
from xllm_compile.progress import progress

log = logging.getLogger(__name__)

# general.architecture -> HF architectures name. Mistral GGUFs are written as "llama" by llama.cpp.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp's LlamaModel permutes q/k rows for its GGML rope kernel; Qwen2/3 are written as is.
PERMUTED_QK = frozenset({"llama"})
# Storage types gguf.quants.dequantize reads (F32/F16 directly, the rest through its block codecs).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
SHARD_BYTES = 256 << 20  # flush a safetensors shard at ~256 MB: bounded memory on big models
# --quant keep: the GGUF's quantized matrices as they are, beside the dequantized folder
BLOCKS_FILE = "gguf_blocks/blocks.safetensors"  # not beside the shards: never loaded as one

TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_folder(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
    shard_bytes: int = SHARD_BYTES,
    keep_blocks: bool = False,
) -> Path:
    """Convert a GGUF file into an HF model folder at `out_dir`; returns `out_dir`.

    Tensors are dequantized to `dtype` one at a time and written to safetensors shards of about
    `shard_bytes` (then `model.safetensors.index.json`), so memory stays near one shard.
    `keep_blocks`: also write the matrices stored in a block format the kernels read (Q8_0,
    Q4_0, Q4_1, Q4_K, Q6_K) as they are into BLOCKS_FILE (`read_blocks`), q/k rows put in HF's
    order like the floats.

    Raises:
        ConfigError: the file does not exist.
        WeightError: the file is not a GGUF, or is truncated or corrupt.
        UnsupportedModelError: its architecture, a tensor, or a storage type is not supported.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    check_architecture(meta)
    _check_tensors(reader, gguf_path)
    hf_config = hf_config_from_gguf(meta, {t.name: _torch_shape(t) for t in reader.tensors})
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = _write_weights(
        reader, hf_config, out_dir, dtype, show_progress, shard_bytes, keep_blocks
    )
    if keep_blocks:
        _save_blocks(blocks, out_dir / BLOCKS_FILE)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_tokenizer(meta, out_dir, gguf_path)
    return out_dir


def open_gguf(path: Path):
    """A `gguf.GGUFReader` over `path` (memory-mapped), or a one-line XllmError."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UnsupportedModelError(
            "reading GGUF files needs the gguf package: pip install gguf"
        ) from None
    if not path.is_file():
        raise ConfigError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a type id this gguf package does not know
            raise UnsupportedModelError(f"{path.name}: unknown GGML tensor type ({e})") from None
        raise WeightError(f"{path.name}: not a GGUF file, or truncated or corrupt ({e})") from None
    except (KeyError, IndexError, OSError, OverflowError, UnicodeDecodeError) as e:
        raise WeightError(f"{path.name}: not a GGUF file, or truncated or corrupt ({e})") from None


def read_metadata(reader) -> dict[str, Any]:
    """Every metadata key -> its Python value (strings, numbers, lists)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise WeightError(f"GGUF metadata {key!r} is corrupt ({e})") from None
    return meta


def _torch_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-moving first; torch lists them the other way round.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def check_architecture(meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def hf_config_from_gguf(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict:
    """The config.json dict of a GGUF's model (transformers 5 style, plus `rope_theta`)."""
    arch = check_architecture(meta)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"GGUF metadata has no {arch}.{key}")
        return value

    if "rope_freqs.weight" in shapes:
        raise UnsupportedModelError(
            "GGUF rope_freqs (Llama 3.1 style rope scaling) is not supported yet"
        )
    layers = int(get("block_count"))
    present = {int(n.split(".")[1]) for n in shapes if n.startswith("blk.")}
    if present != set(range(layers)):
        raise WeightError(
            f"GGUF metadata says {arch}.block_count={layers}, but the file holds tensors for "
            f"{len(present)} layers: the file is corrupt or mislabelled"
        )
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    theta = float(get("rope.freq_base", 10000.0))
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _shape(shapes, "token_embd.weight")[0],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length") or _q_rows(shapes) // heads),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_theta": theta,
        "rope_parameters": _rope_parameters(meta, arch, theta),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": "blk.0.ffn_up.bias" in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_token_ids(meta),
    }


def _shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise WeightError(f"GGUF file has no tensor {name!r}")
    return shapes[name]


def _q_rows(shapes: dict[str, tuple[int, ...]]) -> int:
    return _shape(shapes, "blk.0.attn_q.weight")[0]  # num_heads * head_dim


def _rope_parameters(meta: dict[str, Any], arch: str, theta: float) -> dict[str, Any]:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        factor = float(meta[f"{arch}.rope.scaling.factor"])
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    raise UnsupportedModelError(f"GGUF rope scaling {kind!r} is not supported; supported: linear")


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{suffix}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} is not supported (no HF counterpart)")


def _check_tensors(reader, path: Path) -> None:
    """Fail before writing anything: every tensor has a known name and a readable type."""
    for t in reader.tensors:
        hf_tensor_name(t.name)
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {t.name!r} is stored as {t.tensor_type.name}, which is not "
                f"supported; supported: {', '.join(SUPPORTED_TYPES)}"
            )


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (transformers `_reverse_permute_weights`).

    llama.cpp stores each head's rows as [2, D/2] -> [D/2, 2] (interleaved rotary pairs); this
    swaps them back to HF's rotate-half layout. Works on weights [H*D, in] and biases [H*D].
    """
    half = weight.shape[0] // num_heads // 2
    rows = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return rows.transpose(1, 2).reshape(weight.shape)  # [H, 2, D/2, ...] -> [H*D, ...]


def _dequantize(tensor, shape: tuple[int, ...]) -> torch.Tensor:
    from gguf.quants import dequantize

    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not values.flags.writeable:  # F32 tensors come back as views of the read-only mmap
        values = values.copy()
    return torch.from_numpy(values).reshape(shape)


def _write_weights(reader, hf_config, out_dir, dtype, show_progress, shard_bytes, keep) -> dict:
    permute = hf_config["model_type"] in PERMUTED_QK
    heads = {
        "attn_q": hf_config["num_attention_heads"],
        "attn_k": hf_config["num_key_value_heads"],
    }
    shards = ShardWriter(out_dir, shard_bytes)
    blocks: dict[str, tuple[str, torch.Tensor]] = {}
    with progress(len(reader.tensors), "dequantizing GGUF", "tensor", show_progress) as bar:
        for t in reader.tensors:
            try:
                weight = _dequantize(t, _torch_shape(t))
            except (ValueError, RuntimeError) as e:
                raise WeightError(f"GGUF tensor {t.name!r} is corrupt ({e})") from None
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if permute and kind in heads:
                weight = unpermute_qk(weight, heads[kind])
            shards.add(hf_tensor_name(t.name), weight.to(dtype))
            qtype = GGUF_TYPES.get(t.tensor_type.name)
            if keep and qtype is not None and len(t.shape) == 2:
                raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))  # [N, row_bytes] copy
                if permute and kind in heads:
                    raw = unpermute_qk(raw, heads[kind])
                blocks[hf_tensor_name(t.name)] = (qtype, raw.contiguous())
            bar.update(1)
    shards.close()
    return blocks


def _save_blocks(blocks: dict, path: Path) -> None:
    qtypes = {name: qtype for name, (qtype, _) in blocks.items()}
    tensors = {name: raw for name, (_, raw) in blocks.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata={"format": "pt", "qtypes": json.dumps(qtypes)})


def read_blocks(folder: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """BLOCKS_FILE's matrices: name -> (format, uint8 [N, row_bytes]), each checked whole.

    Raises:
        WeightError: the file is missing, unreadable, or a tensor is not whole blocks.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / BLOCKS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            qtypes = json.loads((f.metadata() or {}).get("qtypes", "{}"))
            out = {}
            for name in f.keys():
                qtype, raw = qtypes.get(name), f.get_tensor(name)
                if qtype not in FORMATS:
                    raise WeightError(f"{path}: tensor {name!r} has no known block format")
                if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % FORMATS[qtype][1]:
                    raise WeightError(f"{path}: tensor {name!r} is not whole {qtype} blocks")
                out[name] = (qtype, raw)
            return out
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise WeightError(f"{path}: cannot read the GGUF's blocks ({e})") from None


class ShardWriter:
    """Writes tensors into safetensors shards of about `shard_bytes`, each flushed as it fills,
    then renames them `model-0000i-of-0000n.safetensors` and writes the index (one shard:
    `model.safetensors`, no index)."""

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []  # written shards and their tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        path = self.out_dir / f".shard-{len(self.files):05d}.safetensors"
        save_safetensors(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self.flush()
        n = len(self.files)
        if n == 1:
            shutil.move(self.files[0][0], self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            shutil.move(path, self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
