"""Qwen2 / Qwen2.5: Llama's body with a bias on q/k/v (none on o_proj)."""

from __future__ import annotations

import dataclasses
from typing import Any

from xllm_compile.config import ModelConfig
from xllm_compile.hf_config import parse_model_config


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    config = parse_model_config(hf, family="qwen2")
    return dataclasses.replace(config, qkv_bias=True, o_bias=False, mlp_bias=False)
