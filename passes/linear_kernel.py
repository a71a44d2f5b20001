"""linear_kernel: `aten.linear` -> `xllm::linear` where the target's kernel streams weights.

    linear = aten.linear(x, w_qkv, b)        ->   linear = xllm.linear(x, w_qkv, b)

On CPU, xllm::linear (kernels/linear.py, kernels/cpu/xllm_linear.cpp) reads each weight row once
for all rows of a decode step (up to 16 rows in fp32, 8 in bf16) and calls ATen's linear beyond:
0.65-0.8x ATen's time for 4-16 rows in fp32 and 0.55-0.8x for 1-8 rows in bf16 on SmolLM2's
matrices (tools/bench/bench_kernels.py --ops linear). It has an `.out` overload, so the memory
planner still places the result in the activation arena. Other devices keep aten.linear (their
GEMMs are the fast path there), as do dtypes the kernel does not take.
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.kernels import cpu as cpu_kernels
from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import aten, is_call, val

DTYPES = (torch.float32, torch.bfloat16)


class LinearKernel(Pass):
    name = "linear_kernel"
    VERSION = 1
    description = "aten.linear -> xllm::linear (CPU: weights streamed once for decode batches)"

    def applies(self, ctx: PassContext) -> str | None:
        if ctx.device != "cpu":
            return f"{ctx.device} keeps aten.linear"
        why_not = cpu_kernels.ensure_loaded()
        return None if why_not is None else f"{why_not}: aten.linear kept"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        stats = PassStats()
        for node in [n for n in gm.graph.nodes if is_call(n, aten.linear.default)]:
            x, w = val(node.args[0]), val(node.args[1])
            if (
                x is None
                or w is None
                or w.dim() != 2
                or x.dtype not in DTYPES
                or w.dtype != x.dtype
            ):
                stats.count("kept")
                continue
            node.target = torch.ops.xllm.linear.default
            stats.matches += 1
            stats.count("linear")
        return stats
