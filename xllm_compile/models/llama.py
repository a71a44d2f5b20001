"""Llama 1/2/3 (rope scaling "linear" and "llama3"): the shared decoder as is."""

from __future__ import annotations

from typing import Any

from xllm_compile.config import ModelConfig
from xllm_compile.hf_config import parse_model_config


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    # `attention_bias` puts a bias on q/k/v and o (transformers LlamaAttention).
    return parse_model_config(hf, family="llama")
