"""`xllm::` custom ops (torch.library): each with a reference implementation, a fake
implementation for tracing, and a CPU kernel where a benchmark showed it wins (tools/bench/).
Importing this package registers them, with the CUDA bindings (registering a CUDA kernel needs
no GPU, so their logic is testable on the CPU)."""

import torch

import xllm_compile.kernels.cuda.bindings  # noqa: E402,F401  (CUDA registrations, via the registry)
from xllm_compile.kernels.all_reduce_add_rms_norm import all_reduce_add_rms_norm
from xllm_compile.kernels.attention import attention
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm
from xllm_compile.kernels.linear import linear
from xllm_compile.kernels.linear_q import linear_q
from xllm_compile.kernels.rms_norm import rms_norm
from xllm_compile.kernels.rotary_embedding import rotary_embedding
from xllm_compile.kernels.silu_and_mul import silu_and_mul
from xllm_compile.kernels.store_kv import store_kv

__all__ = [
    "all_reduce_add_rms_norm",
    "attention",
    "fused_add_rms_norm",
    "linear",
    "linear_q",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]

# torch.library.custom_op gives each op Python kernels for the Autograd and ADInplaceOrView keys,
# and a call reaches them whenever an input is a normal (not inference) tensor: the weights and
# the KV cache always are. They cost ~10-20 us of Python a call (store_kv on CPU: 23 of 24 us),
# ~180 calls a SmolLM2 decode step, and make an eager GPU step CPU-bound. The ops are
# inference-only (none has a backward), so both keys fall through to the device kernel. The
# version counter of a mutated KV cache is then not bumped: nothing records it for autograd.
_fallthrough = torch.library.Library("xllm", "IMPL")
for _op in __all__:
    for _key in ("Autograd", "ADInplaceOrView"):
        _fallthrough.impl(_op, torch.library.fallthrough_kernel, _key)
