"""Mistral: Llama's body plus an optional sliding attention window."""

from __future__ import annotations

import dataclasses
from typing import Any

from xllm_compile.config import ModelConfig
from xllm_compile.hf_config import parse_model_config


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    # transformers MistralAttention has no biases, whatever the config says.
    config = parse_model_config(hf, family="mistral")
    return dataclasses.replace(config, qkv_bias=False, o_bias=False, mlp_bias=False)
