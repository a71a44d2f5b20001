"""The CUDA dispatch registrations of the `xllm::` ops: each calls through the kernel registry
(kernels/registry.py), which runs the Triton kernel where triton imports and the operands suit
it, else the fallback (the sync-free composition for attention, the reference otherwise).
Registering needs no GPU, so this runs at import everywhere; nothing imports triton until a CUDA
tensor reaches an op."""

from __future__ import annotations

from xllm_compile.kernels import registry

OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "store_kv",
       "attention")  # fmt: skip

registry.register("cuda", OPS)
