"""This machine's ceilings, measured once and cached: copy bandwidth (GB/s of bytes read plus
written by a 256 MiB tensor copy) and peak matmul rate (GFLOP/s of a 2048^3 fp32 and bf16 matmul),
for the thread count in use. `xllm profile` rates each op against them.

Cached in `$XDG_CACHE_HOME/xllm_compile/ceilings.json` (default ~/.cache/...) by device, thread
count and CPU model; XLLM_CEILINGS_REMEASURE=1 measures again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xllm_compile" / "ceilings.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _copy_gb_s(device: str) -> float:
    src = torch.ones(1 << 26, device=device)  # 256 MiB of fp32
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best(lambda: dst.copy_(src)) / 1e9


def _measure(device: str) -> dict:
    out = {"copy_gb_s": _copy_gb_s(device)}
    n = 2048
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device).to(dtype)
        out[f"matmul_{str(dtype).removeprefix('torch.')}_gflop_s"] = (
            2 * n**3 / _best(lambda a=a: a @ a) / 1e9
        )
    return out


def measure(device: str = "cpu") -> dict:
    """{"copy_gb_s", "matmul_float32_gflop_s", "matmul_bfloat16_gflop_s", "threads", "cpu"}."""
    threads = torch.get_num_threads()
    key = f"{device}|{threads}|{_cpu_model()}"
    path = _cache_file()
    cached = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
    if (
        key in cached
        and not os.environ.get("XLLM_CEILINGS_REMEASURE")
        and isinstance(cached[key], dict)
    ):
        return cached[key]
    entry = {**_measure(device), "threads": threads, "cpu": _cpu_model(), "device": device}
    cached[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a new measurement next time
    return entry
