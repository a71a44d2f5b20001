"""Qwen3: Llama's body with RMSNorm on each query and key head (q_norm/k_norm) before rotary."""

from __future__ import annotations

import dataclasses
from typing import Any

from xllm_compile.config import ModelConfig


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    # transformers Qwen3Attention: q/k/v/o bias follow `attention_bias`; the MLP has none.
    config = ModelConfig.from_hf(hf, family="qwen3")
    return dataclasses.replace(config, qk_norm=True, mlp_bias=False)
