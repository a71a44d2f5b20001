"""Triton kernels of the `xllm::` ops, for CUDA (kernels/cuda/bindings.py registers them on the
CUDA dispatch key when triton is importable). Every kernel computes in fp32 and reads its
operands through their strides, so the page pool's strided KV views need no copy, and none
synchronizes with the host: a decode or prefill step through them can be captured in a CUDA
graph. `xllm::linear` stays with cuBLAS.

They run on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is
imported), which is how CI tests them against the references (tests/kernels/test_triton.py).
"""

from __future__ import annotations

import functools


@functools.cache
def unavailable() -> str | None:
    """None when triton imports here, else why not (for the kernel registry)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at import
        return (
            f"triton is not importable ({type(e).__name__}: {e}); pip install 'xllm-compile[cuda]'"
        )
    return None
