"""config.json -> ModelConfig: every Hugging Face config quirk (transformers 4 and 5 rope styles,
sliding-window flags, eos lists) in one place. The compiler's side only: the runtime reads the
ModelConfig the manifest holds (`ModelConfig.from_dict`) and never imports this."""

from __future__ import annotations

from typing import Any

from xllm_compile.config import ModelConfig, RopeConfig
from xllm_compile.config_fields import check_fields
from xllm_compile.errors import ConfigError, UnsupportedModelError


def parse_model_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """Build from a config.json dict (transformers 4 or 5 style); every field is read, or
    inert, or refused (config_fields.py).

    Raises:
        ConfigError: a required field is missing or has the wrong type.
        UnsupportedModelError: a value the compiler does not implement (config_fields.py).
    """
    check_fields(hf)
    try:
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or hidden // num_heads)
        return ModelConfig(
            family=family,
            architecture=hf["architectures"][0],
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=_parse_sliding_window(hf),
            hidden_act=str(hf.get("hidden_act", "silu")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        )
    except KeyError as e:
        raise ConfigError(f"config.json: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json: a field has the wrong type ({e})") from None


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)


def _parse_rope(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 nests everything in `rope_parameters`; transformers 4 has `rope_theta` at the
    # top level and an optional `rope_scaling` dict whose type key is `rope_type` or `type`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": str(rope_type)}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if merged.get(key) is not None:
            kwargs[key] = float(merged[key])
    if merged.get("original_max_position_embeddings") is not None:
        kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


def _parse_sliding_window(hf: dict[str, Any]) -> int:
    window = hf.get("sliding_window")
    if not window:
        return 0
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return 0  # Qwen2 carries a window value but only uses it when this flag is set
    layers, first = int(hf.get("num_hidden_layers", 0)), hf.get("max_window_layers")
    if "use_sliding_window" in hf and first is not None and not hf.get("layer_types"):
        # transformers 4 Qwen2/3: layers from `max_window_layers` on slide, those before do not
        if int(first) >= layers:
            return 0
        if int(first) > 0:
            raise UnsupportedModelError(
                f"config.json: max_window_layers={first} mixes sliding and full attention "
                "layers, which is not supported"
            )
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "sliding_attention" for t in layer_types):
        if all(t == "full_attention" for t in layer_types):
            return 0
        raise UnsupportedModelError("config.json: mixed sliding/full attention layers")
    return int(window)
