"""The kernel registry and `xllm kernels`: every op has each backend's choice and the reference
last; the listing says what runs on this machine and why each fallback was taken (a missing
library, disabled kernels, a forced lower ISA), in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from xllm_compile.kernels import registry

OPS = {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "store_kv",
       "attention", "linear", "linear_q"}  # fmt: skip


def kernels(*args: str, **env: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "xllm_compile", "kernels", "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_op_ends_every_backend_with_the_reference():
    assert set(registry.registry()) == OPS
    for entry in registry.registry().values():
        for backend in registry.BACKENDS:
            impls = entry.for_backend(backend)
            assert impls[-1].name == "reference" and impls[-1].unavailable() is None


def test_xllm_kernels_lists_what_runs_here_and_why_not_the_rest():
    rows = {(r["op"], r["backend"]): r for r in kernels()}
    assert {op for op, _ in rows} == OPS and len(rows) == 3 * len(OPS)
    assert rows[("attention", "cpu")]["runs"].startswith("C++ (")
    assert rows[("attention", "cuda")]["runs"] == "triton"  # triton is a dev dependency
    assert rows[("linear", "cuda")]["runs"] == "cuBLAS (aten.linear)"
    npu = rows[("rms_norm", "npu")]
    assert npu["runs"] == "reference" and "torch_npu is not importable" in npu["fallbacks"][0]


def test_disabled_kernels_and_a_forced_isa_are_named():
    off = {r["op"]: r for r in kernels("--backend", "cpu", XLLM_CPU_KERNELS="0")}
    assert off["rms_norm"]["runs"] == "reference"
    assert "disabled by XLLM_CPU_KERNELS=0" in off["rms_norm"]["fallbacks"][0]
    avx2 = {r["op"]: r for r in kernels("--backend", "cpu", ATEN_CPU_CAPABILITY="avx2")}
    assert avx2["attention"]["runs"] == "C++ (AVX2)"
