"""`xllm::` custom ops (torch.library): each with a reference implementation (also the CPU path)
and a fake implementation for tracing. Importing this package registers them, with the CUDA
bindings (registering a CUDA kernel needs no GPU, so their logic is testable on the CPU)."""

import xllm_compile.kernels.cuda.attention  # noqa: F401  (CUDA binding of xllm::attention)
from xllm_compile.kernels.attention import attention
from xllm_compile.kernels.store_kv import store_kv

__all__ = ["attention", "store_kv"]
