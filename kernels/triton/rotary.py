"""Rotary embedding of q and k in Triton, both pairings (kernels/rotary_embedding.py): one
program per (token, head), out[i] = x[i] * cos[t(i)] + sign(i) * x[p(i)] * sin[t(i)], with the
partner p and sign of rotate-half (neox) or interleaved pairs, and t(i) = i for full-width
tables, or the pair's angle for half-width ones ([T, 1, D/2])."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, x_t, x_h, c_t, o_t, o_h,
                   D: tl.constexpr, IS_NEOX: tl.constexpr, HALF_TABLE: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    token = tl.program_id(0) // n_heads
    head = tl.program_id(0) % n_heads
    i = tl.arange(0, BLOCK)
    mask = i < D
    half = D // 2
    t = i
    if IS_NEOX:
        partner = tl.where(i < half, i + half, i - half)
        sign = tl.where(i < half, -1.0, 1.0)
        if HALF_TABLE:
            t = tl.where(i < half, i, i - half)
    else:
        partner = tl.where(i % 2 == 0, i + 1, i - 1)
        sign = tl.where(i % 2 == 0, -1.0, 1.0)
        if HALF_TABLE:
            t = i // 2
    base = x_ptr + token * x_t + head * x_h
    x = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + token * c_t + t, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + token * c_t + t, mask=mask, other=0.0).to(tl.float32)
    y = x * c + sign * xp * s
    tl.store(out_ptr + token * o_t + head * o_h + i, y.to(out_ptr.dtype.element_ty), mask=mask)


def supports(q, k, cos, sin) -> str | None:
    """None when the kernel takes these operands, else why not (the reference runs)."""
    d = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[-1] != d:
        return "q and k must be [T, heads, D]"
    for t in (cos, sin):
        if t.dim() != 3 or t.shape[0] != q.shape[0] or t.shape[1] != 1:
            return "cos/sin must be [T, 1, D] or [T, 1, D/2]"
        if t.shape[-1] not in (d, d // 2) or t.stride(-1) != 1:
            return "cos/sin must be [T, 1, D] or [T, 1, D/2], last dim contiguous"
    if cos.stride(0) != sin.stride(0) or cos.shape != sin.shape:
        return "cos and sin must have the same shape and layout"
    return None


def _rotate(x, cos, sin, is_neox: bool):
    t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    out = torch.empty((t, h, d), dtype=dtype, device=x.device)
    if t and h:
        _rotary_kernel[(t * h,)](
            x, cos, sin, out, h, x.stride(0), x.stride(1), cos.stride(0), out.stride(0),
            out.stride(1), D=d, IS_NEOX=is_neox, HALF_TABLE=cos.shape[-1] != d,
            BLOCK=triton.next_power_of_2(d),
        )  # fmt: skip
    return out


def rotary_embedding(q, k, cos, sin, is_neox: bool = True):
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)
