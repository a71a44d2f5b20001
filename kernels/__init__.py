"""`xllm::` custom ops (torch.library): each with a reference implementation (also the CPU path)
and a fake implementation for tracing. Importing this package registers them."""

from xllm_compile.kernels.attention import attention
from xllm_compile.kernels.store_kv import store_kv

__all__ = ["attention", "store_kv"]
