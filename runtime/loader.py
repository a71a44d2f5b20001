"""Loads an artifact into a ready Engine: verifies it, loads the program and binds the weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import xllm_compile.kernels  # noqa: F401  (registers the xllm:: ops the program calls)
from xllm_compile import artifact
from xllm_compile.backend import check_device
from xllm_compile.config import DTYPES, ModelConfig
from xllm_compile.errors import ArtifactError
from xllm_compile.runtime.engine import Engine
from xllm_compile.runtime.executor import Executor
from xllm_compile.runtime.kv_cache import ContiguousKVCache
from xllm_compile.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load(
    path: str | Path,
    device: str | None = None,
    max_num_seqs: int | None = None,
    verify: bool = True,
) -> Engine:
    """Load an artifact directory into an Engine.

    Args:
        path: the artifact directory written by `xllm-compile`.
        device: run on this device instead of the one compiled for.
        max_num_seqs: KV-cache slots (concurrent sequences); default: the artifact's limit.
        verify: check every file's sha256 (size is always checked).
    Raises:
        ArtifactError: the artifact is missing, corrupt, tampered with or from another version.
    """
    art = artifact.open_artifact(path, verify=verify)
    m = art.manifest
    device = device or m["device"]
    check_device(device)
    graph_module = _load_program(art)
    params = _load_params(art, m["program"]["params"], device)
    config = ModelConfig.from_dict(m["model"]["config"])
    limits = m["limits"]
    num_seqs = max_num_seqs or limits["max_num_seqs"]
    kv_cache = ContiguousKVCache(
        config.num_layers,
        num_seqs,
        limits["max_model_len"],
        config.num_kv_heads,
        config.head_dim,
        DTYPES[m["dtype"]],
        device,
    )
    tokenizer = Tokenizer(art.path) if m.get("tokenizer") else None
    return Engine(
        Executor(graph_module, params, device),
        kv_cache,
        tokenizer,
        config.eos_token_ids,
        num_seqs,
        limits["max_num_tokens"],
        m,
    )


def _load_program(art: artifact.Artifact) -> torch.fx.GraphModule:
    try:
        ep = torch.export.load(art.file(artifact.PROGRAM))
    except Exception as e:  # torch raises many types for a bad archive
        built = art.manifest.get("versions", {}).get("torch")
        raise ArtifactError(
            f"{art.path}: cannot load {artifact.PROGRAM} (built with torch {built}, running "
            f"torch {torch.__version__}): {type(e).__name__}: {e}"
        ) from None
    return ep.graph_module


def _load_params(art: artifact.Artifact, names: list[str], device: str) -> list[torch.Tensor]:
    try:
        with safe_open(str(art.file(artifact.WEIGHTS)), framework="pt", device=device) as f:
            present = set(f.keys())
            missing = [n for n in names if n not in present]
            if missing:
                raise ArtifactError(f"{art.path}: weights lack {missing[0]!r}; recompile the model")
            return [f.get_tensor(name) for name in names]
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{art.path}: weights file unreadable ({e}); recompile") from None
