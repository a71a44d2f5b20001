"""Reading a Hugging Face model folder: config.json and safetensors weights, streamed tensor by
tensor into the dtype we compile for, with every name and shape checked."""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from xllm_compile.config import read_json
from xllm_compile.errors import ConfigError, WeightError
from xllm_compile.progress import progress

# Tensors some checkpoints carry that the model recomputes (old rotary caches).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_config(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise ConfigError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise ConfigError(
            f"{model_dir} is not a folder; pass a Hugging Face model folder or a .gguf"
        )
    return read_json(model_dir / "config.json", "config.json")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files: those the index file names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index} names {missing[0].name}, which is not in {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightError(f"no *.safetensors weights in {model_dir}")
    return files


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise WeightError(f"{path.name}: corrupt or unreadable safetensors file ({e})") from None


def stream_weights(
    model_dir: Path,
    expected: dict[str, torch.Size],
    dtype: torch.dtype,
    optional: frozenset[str] = frozenset(),
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Read every tensor the model expects, converted to `dtype` one at a time (never a second full
    copy). Raises WeightError naming the first missing, unexpected or misshapen tensor.

    `optional`: names the checkpoint may carry that the model does not need (a tied lm_head).
    """
    weights: dict[str, torch.Tensor] = {}
    files = safetensors_files(model_dir)
    with progress(
        total=len(expected), desc="loading weights", unit="tensor", show=show_progress
    ) as bar:
        for path in files:
            for name, tensor in _iter_file(path):
                if name in optional or name.endswith(IGNORED_SUFFIXES):
                    continue
                if name not in expected:
                    raise WeightError(
                        f"{path.name}: unexpected tensor {name!r} (not in this model)"
                    )
                if tensor.shape != expected[name]:
                    raise WeightError(
                        f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(expected[name])}"
                    )
                weights[name] = tensor.to(dtype)
                bar.update(1)
    missing = [name for name in expected if name not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightError(f"missing weight {missing[0]!r}{more} in {model_dir}")
    return weights


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O errors (ENOSPC...) raised as the OSError they are."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(e), str(path)) from None
