"""Building the C++ CPU kernels: once per source hash and Python/torch version, under a lock that
a dead process cannot hold, with a word to the user while it runs.

    <XLLM_KERNEL_DIR or ~/.cache/xllm_compile/kernels>/xllm_cpu_<hash>/xllm_cpu_<hash>.so
    <same>.lock        fcntl.flock: released by the kernel when its holder dies (a killed build
                       never blocks the next one); waited on for at most `timeout_s`

The hash covers every source and header, the flags, torch's and Python's versions: two
checkouts or environments on one machine each get their own build, and a rebuilt .so never
replaces one another process has loaded. torch's own JIT lock (a `lock` file its FileBaton
waits on forever) is removed before building: holding our lock, nobody else is building there.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (
    "xllm_cpu.cpp",
    "xllm_cpu_avx2.cpp",
    "xllm_linear.cpp",
    "xllm_linear_q.cpp",
    "xllm_decode_attention.cpp",
    "xllm_program.cpp",
    "xllm_pool.cpp",
)
HEADERS = ("xllm_avx512.h", "xllm_cpu_vec.h", "xllm_cpu_vec.inc", "xllm_ops.h", "xllm_pool.h")
CFLAGS = ("-O3",)
BUILD_SECONDS = 50  # a fresh build on a 2-core machine (said to the user before it starts)
LOCK_TIMEOUT_S = 900.0


class KernelBuildError(RuntimeError):
    """The kernels could not be built or loaded (the caller falls back to the references)."""


def kernel_dir() -> Path:
    root = os.environ.get("XLLM_KERNEL_DIR")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "xllm_compile" / "kernels"


def build_name() -> str:
    import torch

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    h.update(" ".join(CFLAGS).encode())
    h.update(f"torch {torch.__version__} python {platform.python_version()}".encode())
    h.update(platform.machine().encode())
    return f"xllm_cpu_{h.hexdigest()[:16]}"


def library_path() -> Path:
    name = build_name()
    return kernel_dir() / name / f"{name}.so"


def build_and_load(timeout_s: float = LOCK_TIMEOUT_S) -> Path:
    """Load the kernels' shared library, building it first if this machine has none yet.

    Raises:
        KernelBuildError: no compiler, a failed build, or the lock held past `timeout_s`.
    """
    import torch

    so = library_path()
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        with _locked(so.parent.with_suffix(".lock"), timeout_s):
            if not so.is_file():  # another process may have built it while we waited
                _build(so)
    try:
        torch.ops.load_library(str(so))
    except (OSError, RuntimeError) as e:
        raise KernelBuildError(f"cannot load {so}: {e}") from None
    return so


def _build(so: Path) -> None:
    from torch.utils.cpp_extension import load

    (so.parent / "lock").unlink(missing_ok=True)  # torch's baton, left by a killed build
    log.warning(
        "building the C++ CPU kernels for this machine (once, about %d s) in %s",
        BUILD_SECONDS,
        so.parent,
    )
    started = time.monotonic()
    with _heartbeat(started):
        try:
            load(
                name=so.stem,
                sources=[str(HERE / f) for f in SOURCES],
                extra_cflags=list(CFLAGS),
                build_directory=str(so.parent),
                is_python_module=False,
                verbose=False,
            )
        except Exception as e:  # no compiler, no ninja, a compile error
            raise KernelBuildError(f"{type(e).__name__}: {str(e)[:300]}") from None
    log.warning("built the C++ CPU kernels in %.0f s", time.monotonic() - started)


@contextmanager
def _heartbeat(started: float, every_s: float = 15.0) -> Iterator[None]:
    """A line every `every_s` seconds while the build runs, so it never looks hung."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            log.warning("still building the C++ CPU kernels (%.0f s)", time.monotonic() - started)

    thread = threading.Thread(target=beat, name="xllm-kernel-build", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def _locked(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive flock on `path`; waits up to `timeout_s` (saying so) for another holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, said = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KernelBuildError(
                        f"another process has held {path} for over {timeout_s:.0f} s "
                        "(building the kernels); try again later or set XLLM_KERNEL_DIR"
                    ) from None
                if not said:
                    log.warning("waiting for another process building the C++ CPU kernels")
                    said = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock
