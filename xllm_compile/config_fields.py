"""Every config.json field of the supported families, and what becomes of it: READ (it changes
the math and `ModelConfig.from_hf` implements it, at the values `check_fields` lets through) or
INERT (it does not change inference numerics: why is written beside it). A value we cannot
honour is refused here with one line naming the field, never ignored.
tests/frontend/test_config_fields.py walks transformers' config classes of each family and fails
on a field that is in neither table, so a new transformers field gets a decision."""

from __future__ import annotations

from typing import Any

from xllm_compile.errors import UnsupportedModelError

# MLP activations (transformers ACT2FN names) the decoder implements; others are refused.
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")

READ = frozenset(
    {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"}
    | {"num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act"}
    | {"max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias"}
    | {"rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor"}
    | {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}
    | {"bos_token_id", "eos_token_id", "architectures", "quantization_config"}
)

INERT = {
    "attention_dropout": "dropout is off at inference",
    "pretraining_tp": "transformers slices the same matmuls and sums them: the same math",
    "initializer_range": "initialization only",
    "use_cache": "the runtime always caches K/V",
    "pad_token_id": "padding rows never reach a real sequence's logits",
    "dtype": "the artifact's dtype is --dtype",
    "torch_dtype": "the artifact's dtype is --dtype (transformers 4 name)",
    "model_type": "the family comes from `architectures`",
    "transformers_version": "provenance",
    "_name_or_path": "provenance",
    "output_attentions": "what transformers returns, not what it computes",
    "output_hidden_states": "what transformers returns, not what it computes",
    "return_dict": "what transformers returns, not what it computes",
    "chunk_size_feed_forward": "chunks the same feed-forward: the same math",
    "is_encoder_decoder": "decoder-only families (False for all of them)",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "tie_encoder_decoder": "encoder-decoder models only",
}


def check_fields(hf: dict[str, Any]) -> None:
    """Refuse the values of READ fields the compiler does not implement.

    Raises:
        UnsupportedModelError: naming the field and its value.
    """
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"config.json: hidden_act={act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(
            f"config.json: quantization_config (quant_method={method!r}) is not supported; "
            "give the unquantized checkpoint or a GGUF file"
        )
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor")
    partial = hf.get("partial_rotary_factor", partial)
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(
            f"config.json: partial_rotary_factor={partial!r} is not supported (only 1)"
        )
