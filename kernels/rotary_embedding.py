"""`xllm::rotary_embedding`: rotate-half rotary embedding of q and k together.

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

for x in (q, k); cos/sin are the [T, 1, D] tables gathered by position (already in the
activation dtype), shared by both. The CPU kernel (kernels/cpu/xllm_cpu.cpp) reads x once and
writes the result, instead of seven ATen ops (slice, neg, slice, cat, mul, mul, add) per tensor.
"""

from __future__ import annotations

import torch

from xllm_compile.kernels.cpu import dispatch_or_fallback


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_ref(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@torch.library.custom_op("xllm::rotary_embedding", mutates_args=())
def rotary_embedding(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, 1, D] (anything that broadcasts to q and k)
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation (every device without a registered kernel)."""
    return rotary_embedding_ref(q, k, cos, sin)


@rotary_embedding.register_fake
def _(q, k, cos, sin):
    def out(x):
        shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
        dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        return torch.empty(shape, dtype=dtype, device=x.device)

    return out(q), out(k)


@rotary_embedding.register_kernel("cpu")
def _(q, k, cos, sin):
    return dispatch_or_fallback("rotary_embedding", rotary_embedding_ref, q, k, cos, sin)
