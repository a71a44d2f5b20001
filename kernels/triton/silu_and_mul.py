"""silu(gate) * up in Triton over rows of two strided views (the halves of a merged gate_up
matmul read in place): silu in fp32, rounded to the activation dtype as ATen's silu rounds,
then the product in the result dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, g_stride, u_stride, out_stride,
                         BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    shape, n = gate.shape, gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    dtype = torch.promote_types(gate.dtype, up.dtype)
    out = torch.empty(g2.shape, dtype=dtype, device=gate.device)
    if g2.shape[0]:
        grid = (g2.shape[0], triton.cdiv(n, BLOCK))
        _silu_and_mul_kernel[grid](
            g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=BLOCK
        )
    return out.view(shape)
