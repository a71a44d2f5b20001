"""`xllm::fused_add_rms_norm`: the residual add followed by RMSNorm, in one op.

    residual' = x + residual                  (in the activation dtype, as the model rounds it)
    normed    = rms_norm(residual', weight, eps)
    returns (normed, residual')

The CPU kernel (kernels/cpu/xllm_cpu.cpp) adds and sums the squares in one pass over each row,
then scales it in a second.
"""

from __future__ import annotations

import torch

from xllm_compile.kernels.cpu import dispatch_or_fallback
from xllm_compile.kernels.rms_norm import rms_norm_ref


def fused_add_rms_norm_ref(x, residual, weight, eps):
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


@torch.library.custom_op("xllm::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation (every device without a registered kernel)."""
    return fused_add_rms_norm_ref(x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    res = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return torch.empty_like(res, dtype=torch.promote_types(res.dtype, weight.dtype)), res


@fused_add_rms_norm.register_kernel("cpu")
def _(x, residual, weight, eps):
    return dispatch_or_fallback(
        "fused_add_rms_norm", fused_add_rms_norm_ref, x, residual, weight, eps
    )
