"""config.json parsing: transformers 4 and 5 rope styles, llama3/linear inv_freq equal to HF's."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.errors import ConfigError, UnsupportedModelError
from xllm_compile.models import model_config_from_hf

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 512,
}


def test_transformers4_and_5_styles_agree():
    v4 = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}
    v4_old_key = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}}
    v5 = {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}
    configs = [model_config_from_hf(c) for c in (v4, v4_old_key, v5)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope.rope_type == "llama3" and configs[0].rope.theta == 500000.0


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", **LLAMA3},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "default"},
    ],
)
def test_inv_freq_equals_transformers(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "architectures"},
        rope_parameters={"rope_theta": 500000.0, **rope},
    )
    ours = model_config_from_hf({**BASE, "rope_parameters": {"rope_theta": 500000.0, **rope}})
    if rope["rope_type"] == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    torch.testing.assert_close(ours.rope.inv_freq(16), expected, rtol=0, atol=0)


def test_family_switches():
    qwen2 = model_config_from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    qwen3 = model_config_from_hf({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    assert qwen3.qk_norm and qwen3.head_dim == 32
    qwen2_window = {
        **BASE,
        "architectures": ["Qwen2ForCausalLM"],
        "sliding_window": 64,
        "use_sliding_window": False,
    }
    assert model_config_from_hf(qwen2_window).sliding_window == 0


def test_bad_configs():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        model_config_from_hf({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match="hidden_size"):
        model_config_from_hf({k: v for k, v in BASE.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="multiple"):
        model_config_from_hf({**BASE, "num_key_value_heads": 3})
