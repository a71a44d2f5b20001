"""Frozen configs: `ModelConfig` (built once from a Hugging Face config.json by
`hf_config.parse_model_config`, the one place where HF quirks are handled; the runtime reads it
back from the manifest with `from_dict` and never imports that parsing) and `CompileConfig`
(what `xllm-compile` was asked to do)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xllm_compile.errors import ConfigError, UnsupportedModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "npu")
EMIT_FORMATS = ("onnx",)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `inv_freq()` reproduces transformers' rope init exactly."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies [D/2] in fp32, as transformers' ROPE_INIT_FUNCTIONS compute them."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            return self._llama3(inv_freq)
        return inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        # Llama 3.1 frequency smoothing: long wavelengths divided by `factor`, short ones kept,
        # the band in between interpolated (transformers `_compute_llama3_parameters`).
        old_len = self.original_max_position_embeddings
        low_wavelen = old_len / self.low_freq_factor
        high_wavelen = old_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelConfig:
    """The model shape and the per-family switches that the shared decoder body reads."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0  # 0 = full attention
    hidden_act: str = "silu"  # the MLP's activation (config_fields.ACTIVATIONS)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"config.json: {name} must be positive, got {getattr(self, name)}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        return cls(**data)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON file or raise a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path} (is this the right folder?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


# --quant (passes/quantize.py); "auto": keep a GGUF's blocks (one rank, CPU), else none
QUANT_MODES = ("auto", "none", "keep", "q8_0", "q4_0", "q4_1", "int8", "int4")
# devices with a kernel for xllm::linear_q (elsewhere --quant is refused, not run slowly)
QUANT_DEVICES = ("cpu",)


@dataclass(frozen=True)
class CompileConfig:
    """What `xllm-compile` was asked to do."""

    model_path: str
    out_dir: str
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # None: min(max_position_embeddings, 4096)
    max_num_tokens: int = 4096  # tokens in one step (prefill budget)
    max_num_seqs: int = 64  # sequences in one step
    buckets: str | None = None  # graph-cache buckets, "decode=1,2,4;kv=64,128"; None: defaults
    show_progress: bool = True
    passes: tuple[str, ...] | None = None  # None: the whole pipeline; (): no passes
    disable_passes: tuple[str, ...] = ()
    dump_graphs: str | None = None  # folder for NN_<pass>.py graph dumps
    verify: bool = True  # check each pass's numbers against the graph before it
    sign_key: str | None = None  # an ed25519 private key: sign the manifest (signing.py)
    tp: int = 1  # tensor-parallel ranks (tp.py): one program and weights file per rank
    # --tp > 1: "auto" compiles the overlap variants and picks one per step size with the
    # cost model (overlap.py); "none": the pipeline's one program for every step
    overlap: str = "auto"
    comm_profile: str | None = None  # a stored all-reduce profile (comm_profile.py)
    # weight-only low-bit matmuls (passes/quantize.py): one of QUANT_MODES
    quant: str = "auto"
    # what the user gave when model_path is a folder converted from it (a .gguf): the manifest
    # records it as the artifact's source (`xllm profile passes ART` recompiles from there)
    source_path: str | None = None
    emit: tuple[str, ...] = ()  # extra formats written beside the program: "onnx" (onnx_export)

    def __post_init__(self) -> None:
        if self.quant not in QUANT_MODES:
            raise ConfigError(f"--quant {self.quant!r}: choose one of {', '.join(QUANT_MODES)}")
        if self.quant not in ("auto", "none") and self.device not in QUANT_DEVICES:
            raise ConfigError(
                f"--quant {self.quant}: no quantized-matmul kernel for {self.device} yet "
                f"(only {', '.join(QUANT_DEVICES)}); compile with --quant none"
            )
        for fmt in self.emit:
            if fmt not in EMIT_FORMATS:
                raise ConfigError(f"--emit {fmt!r}: choose one of {', '.join(EMIT_FORMATS)}")
        if self.overlap not in ("auto", "none"):
            raise ConfigError(f"--overlap {self.overlap!r}: choose auto or none")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r}: choose one of {', '.join(DEVICES)}")
        for name, least in (("max_model_len", 2), ("max_num_tokens", 1), ("max_num_seqs", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                flag = f"--{name.replace('_', '-')}"
                raise ConfigError(f"{flag} must be at least {least}, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
