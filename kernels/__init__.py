"""`xllm::` custom ops (torch.library): each with a reference implementation, a fake
implementation for tracing, and a CPU kernel where a benchmark showed it wins (tools/bench/).
Importing this package registers them, with the CUDA bindings (registering a CUDA kernel needs
no GPU, so their logic is testable on the CPU)."""

import xllm_compile.kernels.cuda.attention  # noqa: F401  (CUDA binding of xllm::attention)
from xllm_compile.kernels.attention import attention
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm
from xllm_compile.kernels.linear import linear
from xllm_compile.kernels.rms_norm import rms_norm
from xllm_compile.kernels.rotary_embedding import rotary_embedding
from xllm_compile.kernels.silu_and_mul import silu_and_mul
from xllm_compile.kernels.store_kv import store_kv

__all__ = [
    "attention",
    "fused_add_rms_norm",
    "linear",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]
