"""`xllm::rms_norm`: RMSNorm with its statistics in fp32, as transformers (and models/decoder.py)
computes it: `weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)` over the last dim.

The CPU kernel (kernels/cpu/xllm_cpu.cpp) makes two vectorized passes over each row (sum of
squares, then scale) instead of running the eight ops torch.export traces (cast, pow, mean, add,
rsqrt, mul, cast, mul); tools/bench/bench_kernels.py.
"""

from __future__ import annotations

import torch

from xllm_compile.kernels.cpu import dispatch_or_fallback


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The unfused math, op for op as the model writes it."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


@torch.library.custom_op("xllm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference implementation (every device without a registered kernel)."""
    return rms_norm_ref(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


@rms_norm.register_kernel("cpu")
def _(x, weight, eps):
    return dispatch_or_fallback("rms_norm", rms_norm_ref, x, weight, eps)
