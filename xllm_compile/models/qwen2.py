"""Qwen2 / Qwen2.5: Llama's body with a bias on q/k/v (none on o_proj)."""

from __future__ import annotations

import dataclasses
from typing import Any

from xllm_compile.config import ModelConfig


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    config = ModelConfig.from_hf(hf, family="qwen2")
    return dataclasses.replace(config, qkv_bias=True, o_bias=False, mlp_bias=False)
