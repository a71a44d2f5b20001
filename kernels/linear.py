"""`xllm::linear`: `x @ weight.T + bias`, with an `.out` overload so that the memory planner can
place its result in the activation arena like any ATen op's.

On CPU (kernels/cpu/xllm_linear.cpp) up to 32 rows (fp32; 8 in bf16) stream each weight row
once for all rows:
a decode step's matmuls run at the memory bandwidth at every batch size and in bf16, where ATen's
GEMM reads fp32 weights at about half of it from 4 rows up and bf16 weights at 10 GB/s. More rows
call ATen. Elsewhere the reference (ATen's linear) runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compile.kernels.cpu import dispatch_or_fallback

_SCHEMA = "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor"
_OUT_SCHEMA = "(Tensor x, Tensor weight, Tensor? bias=None, *, Tensor(a!) out) -> Tensor(a!)"

torch.library.define("xllm::linear", _SCHEMA)
torch.library.define("xllm::linear.out", _OUT_SCHEMA)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    return F.linear(x, weight, bias)


def linear_out_ref(x, weight, bias=None, *, out):
    return torch.ops.aten.linear.out(x, weight, bias, out=out)


torch.library.impl("xllm::linear", "default", linear_ref)
torch.library.impl("xllm::linear.out", "default", linear_out_ref)


@torch.library.register_fake("xllm::linear")
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("xllm::linear.out")
def _(x, weight, bias=None, *, out):
    return out


@torch.library.impl("xllm::linear", "cpu")
def _(x, weight, bias=None):
    return dispatch_or_fallback("linear", linear_ref, x, weight, bias)


@torch.library.impl("xllm::linear.out", "cpu")
def _(x, weight, bias=None, *, out):
    import xllm_compile.kernels.cpu as cpu

    if cpu.ensure_loaded() is None:
        return torch.ops.xllm.linear.out(x, weight, bias, out=out)
    return linear_out_ref(x, weight, bias, out=out)


linear = torch.ops.xllm.linear.default
