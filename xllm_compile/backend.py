"""Which device backends this machine has; a missing one is a clear error, never an import crash."""

from __future__ import annotations

import importlib.util

import torch

from xllm_compile.errors import BackendUnavailableError


def check_device(device: str) -> None:
    """Raise BackendUnavailableError unless `device` ("cpu", "cuda", "npu") can run here."""
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "--device cuda: no CUDA device is visible to torch here; use --device cpu"
        )
    if device == "npu" and importlib.util.find_spec("torch_npu") is None:
        raise BackendUnavailableError(
            "--device npu: torch_npu is not installed (pip install 'xllm-compile[npu]')"
        )
