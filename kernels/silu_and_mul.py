"""`xllm::silu_and_mul`: the gated MLP activation `silu(gate) * up`.

Takes gate and up as two tensors, so it serves both separate gate/up projections and the two
halves of the merged gate_up matmul (strided views, no copy). The CPU kernel
(kernels/cpu/xllm_cpu.cpp) makes one vectorized pass over each row: silu in fp32 with ATen's exp
(rounded to the activation dtype, as ATen's silu rounds), times up, with no [T, I] temporary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compile.kernels.cpu import dispatch_or_fallback


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@torch.library.custom_op("xllm::silu_and_mul", mutates_args=())
def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Reference implementation (every device without a registered kernel)."""
    return silu_and_mul_ref(gate, up)


@silu_and_mul.register_fake
def _(gate, up):
    return torch.empty(
        torch.broadcast_shapes(gate.shape, up.shape),
        dtype=torch.promote_types(gate.dtype, up.dtype),
        device=gate.device,
    )


@silu_and_mul.register_kernel("cpu")
def _(gate, up):
    return dispatch_or_fallback("silu_and_mul", silu_and_mul_ref, gate, up)
