"""Model families written in plain PyTorch over one shared decoder body."""

from xllm_compile.models.decoder import CausalLM, rotary_tables
from xllm_compile.models.registry import ARCHITECTURES, family_for, model_config_from_hf

__all__ = ["ARCHITECTURES", "CausalLM", "family_for", "model_config_from_hf", "rotary_tables"]
