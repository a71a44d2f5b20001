"""Maps Hugging Face `architectures` names to model families (module imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

from xllm_compile.config import ModelConfig
from xllm_compile.errors import UnsupportedModelError

# architecture name in config.json -> family module under xllm_compile.models
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}


def family_for(hf_config: dict[str, Any]) -> str:
    """The family of a config.json dict, or UnsupportedModelError listing what is supported."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    got = ", ".join(map(str, archs)) or f"model_type={hf_config.get('model_type')!r}"
    raise UnsupportedModelError(
        f"architecture {got} is not supported; supported: {', '.join(ARCHITECTURES)}"
    )


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """Parse config.json into a ModelConfig through the family's `from_hf` hook."""
    family = family_for(hf_config)
    module = importlib.import_module(f"xllm_compile.models.{family}")
    return module.from_hf(hf_config)
