"""`xllm::rotary_embedding`: rotary embedding of q and k together, in either pairing.

    out = x * cos + rotate(x) * sin                        for x in (q, k)
    rotate-half (is_neox=True: Llama, Qwen, NeoX)    rotate(x) = cat(-x[..., D/2:], x[..., :D/2])
    interleaved (is_neox=False: GPT-J, GLM, Cohere)  rotate(x) = stack(-x[..., 1::2], x[..., ::2])
                                                                 .flatten(-2)

cos/sin are the tables gathered by position, [T, 1, D] (already in the activation dtype), shared
by q and k. They may also be [T, 1, D/2], one angle per rotated pair (GLM's form computes
`x1 * cos - x2 * sin` on the pairs): the op widens those the way the pairs lie. The CPU kernel
(kernels/cpu/xllm_cpu.cpp) reads x once and writes the result, instead of seven ATen ops (slice,
neg, slice, cat or stack, mul, mul, add) per tensor.
"""

from __future__ import annotations

import torch

from xllm_compile.kernels.cpu import dispatch_or_fallback


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def is_half_width(table: torch.Tensor, head_dim: int) -> bool:
    return head_dim % 2 == 0 and table.shape[-1] == head_dim // 2


def widen(table: torch.Tensor, head_dim: int, is_neox: bool) -> torch.Tensor:
    """A [..., D/2] table (one angle per pair) as [..., D]; any other (D, or 1 to broadcast)
    as it is."""
    if not is_half_width(table, head_dim):
        return table
    return torch.cat((table, table), -1) if is_neox else table.repeat_interleave(2, -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool = True):
    d = x.shape[-1]
    rot = rotate_half(x) if is_neox else rotate_interleaved(x)
    return x * widen(cos, d, is_neox) + rot * widen(sin, d, is_neox)


def rotary_embedding_ref(q, k, cos, sin, is_neox: bool = True):
    return rotate(q, cos, sin, is_neox), rotate(k, cos, sin, is_neox)


@torch.library.custom_op("xllm::rotary_embedding", mutates_args=())
def rotary_embedding(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, 1, D] or [T, 1, D/2] (anything that broadcasts to q and k)
    sin: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation (every device without a registered kernel)."""
    return rotary_embedding_ref(q, k, cos, sin, is_neox)


@rotary_embedding.register_fake
def _(q, k, cos, sin, is_neox=True):
    def out(x):
        d = x.shape[-1]
        tables = [t.shape[:-1] + (d,) if is_half_width(t, d) else t.shape for t in (cos, sin)]
        shape = torch.broadcast_shapes(x.shape, *tables)
        dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        return torch.empty(shape, dtype=dtype, device=x.device)

    return out(q), out(k)


@rotary_embedding.register_kernel("cpu")
def _(q, k, cos, sin, is_neox=True):
    return dispatch_or_fallback("rotary_embedding", rotary_embedding_ref, q, k, cos, sin, is_neox)
