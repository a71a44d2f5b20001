"""Qwen3: Llama's body with RMSNorm on each query and key head (q_norm/k_norm) before rotary."""

from __future__ import annotations

import dataclasses
from typing import Any

from xllm_compile.config import ModelConfig
from xllm_compile.hf_config import parse_model_config


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    # transformers Qwen3Attention: q/k/v/o bias follow `attention_bias`; the MLP has none.
    config = parse_model_config(hf, family="qwen3")
    return dataclasses.replace(config, qk_norm=True, mlp_bias=False)
