"""CPU kernels of the fused `xllm::` ops: C++ (xllm_cpu.cpp, ...), JIT-built once per machine
and source hash with torch.utils.cpp_extension (build.py: ~40 s on 2 cores, then ~0.1 s to
load; `xllm build-kernels` builds them ahead of time). Loading registers them for the CPU
dispatch key, so every later call of `torch.ops.xllm.<op>` on a CPU tensor runs C++ with no
Python in between: at decode sizes the Python reference pays ~2-5 us of dispatch per ATen op
it calls (tools/bench/bench_kernels.py).

Each op's Python CPU entry point calls `ensure_loaded()` on its first use and falls back to the
reference when no compiler is present or XLLM_CPU_KERNELS=0 is set.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

OPS = (
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "store_kv",
    "attention",
    "linear",
    "linear_q",
)


@functools.cache
def ensure_loaded() -> str | None:
    """Build (first time on this machine, build.py) and load the C++ kernels.

    Returns:
        None when the kernels are registered, else why not (the reference implementations run).
    """
    if os.environ.get("XLLM_CPU_KERNELS", "1") == "0":
        return "disabled by XLLM_CPU_KERNELS=0"
    from xllm_compile.kernels.cpu.build import KernelBuildError, build_and_load

    try:
        build_and_load()
    except KernelBuildError as e:
        reason = f"C++ CPU kernels unavailable ({e})"
        log.warning("%s; running the reference implementations", reason)
        return reason
    return None


def dispatch_or_fallback(op_name: str, reference, *args):
    """The Python CPU kernel of `xllm::<op_name>`: load the C++ kernels, which replace this
    registration, then re-dispatch; or run `reference` when they cannot load."""
    import torch

    if ensure_loaded() is None:
        return getattr(torch.ops.xllm, op_name).default(*args)
    return reference(*args)
