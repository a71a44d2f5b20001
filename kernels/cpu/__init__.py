"""CPU kernels of the fused `xllm::` ops: C++ (xllm_cpu.cpp), JIT-built once per machine with
torch.utils.cpp_extension and cached on disk (TORCH_EXTENSIONS_DIR, ~35 s on 2 cores, then
~0.1 s to load). Loading registers them for the CPU dispatch key, so every later call of
`torch.ops.xllm.<op>` on a CPU tensor runs C++ with no Python in between: at decode sizes the
Python reference pays ~2-5 us of dispatch per ATen op it calls (tools/bench/bench_kernels.py).

Each op's Python CPU entry point calls `ensure_loaded()` on its first use and falls back to the
reference when no compiler is present or XLLM_CPU_KERNELS=0 is set.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [str(HERE / f) for f in ("xllm_cpu.cpp", "xllm_linear.cpp", "xllm_decode_attention.cpp")]
# The JIT build versions itself on the sources' text and the flags only: a hash of the headers
# goes into the flags so that editing one rebuilds too.
HEADERS = ("xllm_avx512.h",)
OPS = (
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "store_kv",
    "attention",
    "linear",
)


@functools.cache
def ensure_loaded() -> str | None:
    """Build (first time on this machine) and load the C++ kernels.

    Returns:
        None when the kernels are registered, else why not (the reference implementations run).
    """
    if os.environ.get("XLLM_CPU_KERNELS", "1") == "0":
        return "disabled by XLLM_CPU_KERNELS=0"
    try:
        from torch.utils.cpp_extension import load

        load(
            name="xllm_cpu_kernels",
            sources=SOURCES,
            extra_cflags=["-O3", f"-DXLLM_HEADERS={_headers_hash()}"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, headers or ninja: any build failure means fallback
        reason = f"C++ CPU kernels unavailable ({type(e).__name__}: {str(e)[:200]})"
        log.warning("%s; running the reference implementations", reason)
        return reason
    return None


def _headers_hash() -> str:
    import hashlib

    h = hashlib.sha256()
    for name in HEADERS:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def dispatch_or_fallback(op_name: str, reference, *args):
    """The Python CPU kernel of `xllm::<op_name>`: load the C++ kernels, which replace this
    registration, then re-dispatch; or run `reference` when they cannot load."""
    import torch

    if ensure_loaded() is None:
        return getattr(torch.ops.xllm, op_name).default(*args)
    return reference(*args)
