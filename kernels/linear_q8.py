"""`xllm::linear_q8`: `x @ dequant(qweight, scales).T + bias` over weight-only int8 weights.

Layout (the artifact stores it as two safetensors tensors per matmul, see passes/quantize.py):

    qweight  int8     [N, K]       the weight's values, row-major as the float weight was
    scales   fp16/32  [N, K // G]  one scale per group of G consecutive values of a row
    weight[n, k] = float32(qweight[n, k]) * float32(scales[n, k // G])

G = 32 with fp16 scales is ggml's Q8_0 (`--quant q8_0`: the same numbers as a Q8_0 GGUF's
blocks, d * q in fp32); G = K with fp32 scales is per-channel int8 (`--quant int8`).

The CPU path is, for now, the reference: dequantize-then-matmul (one fp32 weight made per call:
correct, and slower than the float artifact; the streaming int8 kernel is issue 17's next step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SCHEMA = "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor"
_OUT_SCHEMA = (
    "(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None, *, Tensor(a!) out) -> Tensor(a!)"
)

torch.library.define("xllm::linear_q8", _SCHEMA)
torch.library.define("xllm::linear_q8.out", _OUT_SCHEMA)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [N, K] the quantized pair stands for."""
    group = qweight.shape[1] // scales.shape[1]
    return qweight.float() * scales.float().repeat_interleave(group, dim=1)


def linear_q8_ref(x, qweight, scales, bias=None):
    w = dequantize(qweight, scales).to(x.dtype)
    return F.linear(x, w, bias)


def linear_q8_out_ref(x, qweight, scales, bias=None, *, out):
    w = dequantize(qweight, scales).to(x.dtype)
    return torch.ops.aten.linear.out(x, w, bias, out=out)


torch.library.impl("xllm::linear_q8", "default", linear_q8_ref)
torch.library.impl("xllm::linear_q8.out", "default", linear_q8_out_ref)


@torch.library.register_fake("xllm::linear_q8")
def _(x, qweight, scales, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("xllm::linear_q8.out")
def _(x, qweight, scales, bias=None, *, out):
    return out


linear_q8 = torch.ops.xllm.linear_q8.default
