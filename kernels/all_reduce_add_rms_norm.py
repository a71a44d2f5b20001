"""`xllm::all_reduce_add_rms_norm`: a tensor-parallel partial sum's all-reduce, the residual
add and RMSNorm in one op (what `passes/fuse_allreduce_norm.py` emits).

    reduced   = all_reduce(x, "sum", group_name)
    residual' = reduced + residual
    normed    = rms_norm(residual', weight, eps)
    returns (normed, residual')

Every backend runs the composite for now: the functional collective, then
`xllm::fused_add_rms_norm`'s kernel. The op is the place for a kernel that does all three in one
pass over the data (one-shot all-reduce fused with the norm, as TensorRT-LLM's and FlashInfer's
CUDA kernels do).
"""

from __future__ import annotations

import torch

c10d = torch.ops._c10d_functional


@torch.library.custom_op("xllm::all_reduce_add_rms_norm", mutates_args=())
def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The composite (every device)."""
    reduced = c10d.wait_tensor(c10d.all_reduce(x, "sum", group_name))
    return torch.ops.xllm.fused_add_rms_norm(reduced, residual, weight, eps)


@all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps, group_name):
    res = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return torch.empty_like(res, dtype=torch.promote_types(res.dtype, weight.dtype)), res
