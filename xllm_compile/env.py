"""The environment variables xllm-compile reads: debug and test switches only (configuration
travels in the config dataclasses). Each is read when used, so a test can set it per process.

    XLLM_DEBUG_KILL_AT=NAME    SIGKILL at a compile checkpoint (below)
    XLLM_CPU_KERNELS=0         the C++ CPU kernels stay off (read in kernels/cpu, which by the
                               layering imports nothing of ours)
    XLLM_KERNEL_DIR=PATH       where the C++ kernels are built (default: the user cache)
    XLLM_STEP_POOL=0           CPU graphs replay without the step pool (one parallel region per
                               op, as outside a graph; runtime/step_builders.py)
"""

from __future__ import annotations

import os
import signal


def kill_at(checkpoint: str) -> None:
    """XLLM_DEBUG_KILL_AT=NAME: SIGKILL this process when it reaches checkpoint NAME (tests of
    what a killed compile leaves behind; see xllm_compile/staging.py for the names)."""
    if os.environ.get("XLLM_DEBUG_KILL_AT") == checkpoint:
        os.kill(os.getpid(), signal.SIGKILL)


def step_pool() -> bool:
    """Whether decode-sized CPU graphs replay on the step pool (XLLM_STEP_POOL=0: they do not)."""
    return os.environ.get("XLLM_STEP_POOL", "1") != "0"
