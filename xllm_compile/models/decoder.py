"""The one decoder body shared by every family (Llama, Qwen2, Qwen3, Mistral), in plain PyTorch.

The math mirrors transformers' implementations op for op (fp32 RMSNorm, rotate-half rotary with
cos/sin in fp32 cast to the activation dtype) so that compiled logits match them. Nothing here is
fused: finding RMSNorm, SiLU*mul and rotary patterns is the passes' job. Only the KV-cache write
and attention are `xllm::` ops, because they touch runtime-owned memory.

Inputs are a flat ragged batch: T tokens of B sequences packed into one dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import xllm_compile.kernels  # noqa: F401  (registers torch.ops.xllm.*)
from xllm_compile.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)  # statistics in fp32, as transformers does
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_len, D] in fp32, gathered by position (computed at compile time)."""

    def __init__(self, config: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.register_buffer("cos_cached", torch.empty(max_len, config.head_dim), persistent=True)
        self.register_buffer("sin_cached", torch.empty(max_len, config.head_dim), persistent=True)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        cos = self.cos_cached[positions].to(dtype)  # [T, D]
        sin = self.sin_cached[positions].to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D], broadcast over heads


def rotary_tables(config: ModelConfig, max_len: int) -> dict[str, torch.Tensor]:
    """The real cos/sin tables; computed exactly as transformers computes them per step."""
    inv_freq = config.rope.inv_freq(config.head_dim)  # [D/2]
    freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
    return {"cos_cached": emb.cos(), "sin_cached": emb.sin()}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        self.sliding_window = c.sliding_window
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:  # Qwen3: RMSNorm over each head before rotary
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.has_qk_norm = c.qk_norm

    def forward(self, x, cos, sin, batch: dict[str, torch.Tensor], kv_cache):
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        torch.ops.xllm.store_kv(
            kv_cache, self.layer_idx, k, v, batch["token_slots"], batch["positions"]
        )
        o = torch.ops.xllm.attention(
            q,
            kv_cache,
            self.layer_idx,
            batch["positions"],
            batch["seq_slots"],
            batch["query_lens"],
            batch["seq_lens"],
            self.scale,
            self.sliding_window,
        )  # [T, H, D]
        return self.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# transformers' ACT2FN, as each is written there (config_fields.ACTIVATIONS lists the names)
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: (
        0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3.0))))
    ),
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, batch, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, max_len)

    def forward(self, input_ids, batch, kv_cache):
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(batch["positions"], x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch, kv_cache)
        return self.norm(x)


class CausalLM(nn.Module):
    """Decoder + LM head. `forward` takes the flat ragged batch and returns logits [N, V] for the
    N tokens picked by `logits_indices` (the last token of each sequence when generating)."""

    def __init__(self, config: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, max_len)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, position of each token in its sequence
        token_slots: torch.Tensor,  # [T] int64, KV slot of the sequence each token belongs to
        seq_slots: torch.Tensor,  # [B] int64, KV slot of each sequence
        query_lens: torch.Tensor,  # [B] int64, tokens of each sequence in this step
        seq_lens: torch.Tensor,  # [B] int64, context length of each sequence after this step
        logits_indices: torch.Tensor,  # [N] int64, rows of the flat batch to compute logits for
        kv_cache: torch.Tensor,  # [L, 2, S, M, Hkv, D], written in place
    ) -> torch.Tensor:
        batch = {
            "positions": positions,
            "token_slots": token_slots,
            "seq_slots": seq_slots,
            "query_lens": query_lens,
            "seq_lens": seq_lens,
        }
        hidden = self.model(input_ids, batch, kv_cache)
        return self.compute_logits(hidden[logits_indices])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # the head when the model has one (untied; or one put there from outside, as a
        # vocab-parallel slice of the tied embedding), else the embedding itself
        head = getattr(self, "lm_head", None)
        if head is None:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return head(hidden)
