"""The kernel registry: for every `xllm::` op, its reference, and one implementation per backend
(cpu, cuda, npu) with the condition under which it applies. `lower_ops` binds from it (what the
compile log's bindings say), the CUDA and NPU dispatch registrations call through it (so a call
whose operands a kernel refuses falls back, one rule at a time, to the next), and `xllm kernels`
prints it for this machine with the reason for every fallback taken.

An implementation is tried when `unavailable()` (machine level: a library, an ISA, a build) is
None and, per call, `supports(*args)` (operand level: dtype, layout) is None; the reference
(torch ops on the operands' device) is always last.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("cpu", "cuda", "npu")


@dataclass(frozen=True)
class Impl:
    backend: str
    name: str  # what runs: "C++", "triton", "torch_npu.npu_rms_norm", "reference"...
    requires: str  # the condition, in words
    unavailable: Callable[[], str | None]  # None when it can run on this machine, else why not
    fn: Callable | None = None  # None: the reference
    supports: Callable[..., str | None] | None = None  # None for these operands, else why not


@dataclass(frozen=True)
class OpKernels:
    name: str  # "rms_norm" (the op is torch.ops.xllm.<name>)
    reference: Callable
    impls: tuple[Impl, ...]

    def for_backend(self, backend: str) -> list[Impl]:
        return [i for i in self.impls if i.backend == backend]


def _always() -> None:
    return None


def _lazy(module: str, attr: str) -> Callable:
    """`module.attr`, imported on first call: Triton kernels are decorated at import, which must
    come after TRITON_INTERPRET is set (tests) and costs ~1 s (no import unless used)."""

    def call(*args, **kwargs):
        fn = getattr(importlib.import_module(f"xllm_compile.kernels.{module}"), attr)
        return fn(*args, **kwargs)

    return call


def _cpu_kernels() -> str | None:
    from xllm_compile.kernels import cpu

    return cpu.ensure_loaded()


def _triton() -> str | None:
    from xllm_compile.kernels.triton import unavailable

    return unavailable()


def _torch_npu() -> str | None:
    from xllm_compile.kernels.npu import unavailable

    return unavailable()


def _float_dtypes(*tensors) -> str | None:
    ok = (torch.float32, torch.float16, torch.bfloat16)
    bad = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.dtype not in ok]
    return f"dtype {bad[0]} (float32/float16/bfloat16 only)" if bad else None


def _rotary_supports(q, k, cos, sin, is_neox=True) -> str | None:
    from xllm_compile.kernels.triton.rotary import supports

    return _float_dtypes(q, k, cos, sin) or supports(q, k, cos, sin)


def _kv_supports(kv_cache, *args, **kwargs) -> str | None:
    if kv_cache.stride(-1) != 1:
        return "the KV cache's head dim is not contiguous"
    return _float_dtypes(kv_cache)


def _attention_supports(q, kv_cache, *args, **kwargs) -> str | None:
    return _kv_supports(kv_cache) or _float_dtypes(q)


def _cpu() -> Impl:
    isa = torch.backends.cpu.get_cpu_capability()  # what ATEN_CPU_CAPABILITY forces, too
    return Impl("cpu", f"C++ ({isa})", "the C++ kernels built: a C++ compiler", _cpu_kernels)


def _ref(backend: str) -> Impl:
    return Impl(backend, "reference", "always (torch ops on the device)", _always)


def _tt(module: str, attr: str, supports=None) -> Impl:
    return Impl(
        "cuda",
        "triton",
        "triton importable; float dtypes",
        _triton,
        _lazy(f"triton.{module}", attr),
        supports or (lambda *a, **k: _float_dtypes(*a)),
    )


def _npu(attr: str, call: str, supports=None) -> Impl:
    return Impl(
        "npu",
        f"torch_npu.{call}",
        "torch_npu importable",
        _torch_npu,
        _lazy("npu", attr),
        supports,
    )


@functools.cache
def registry() -> dict[str, OpKernels]:
    from xllm_compile.kernels.attention import attention_reference
    from xllm_compile.kernels.cuda.attention import attention_composite
    from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
    from xllm_compile.kernels.linear import linear_ref
    from xllm_compile.kernels.linear_q import linear_q_ref
    from xllm_compile.kernels.rms_norm import rms_norm_ref
    from xllm_compile.kernels.rotary_embedding import rotary_embedding_ref
    from xllm_compile.kernels.silu_and_mul import silu_and_mul_ref
    from xllm_compile.kernels.store_kv import store_kv_reference

    composite = Impl(
        "cuda",
        "composite (sync-free torch ops)",
        "always; CUDA-graph capturable",
        _always,
        attention_composite,
    )
    ops = [
        OpKernels(
            "rms_norm",
            rms_norm_ref,
            (
                _cpu(),
                _tt("norm", "rms_norm"),
                _npu("rms_norm", "npu_rms_norm"),
            ),
        ),
        OpKernels(
            "fused_add_rms_norm",
            fused_add_rms_norm_ref,
            (
                _cpu(),
                _tt("norm", "fused_add_rms_norm"),
                _npu("fused_add_rms_norm", "npu_add_rms_norm"),
            ),
        ),
        OpKernels(
            "silu_and_mul",
            silu_and_mul_ref,
            (
                _cpu(),
                _tt("silu_and_mul", "silu_and_mul"),
                _npu("silu_and_mul", "npu_swiglu"),
            ),
        ),
        OpKernels(
            "rotary_embedding",
            rotary_embedding_ref,
            (
                _cpu(),
                _tt("rotary", "rotary_embedding", _rotary_supports),
                _npu("rotary_embedding", "npu_rotary_mul", _npu_rotary_supports),
            ),
        ),
        OpKernels(
            "store_kv",
            store_kv_reference,
            (
                _cpu(),
                _tt("store_kv", "store_kv", _kv_supports),
                _npu("store_kv", "npu_scatter_nd_update_"),
            ),
        ),
        OpKernels(
            "attention",
            attention_reference,
            (
                _cpu(),
                _tt("attention", "attention", _attention_supports),
                composite,
                _npu("attention", "npu_fused_infer_attention_score", _npu_attention_supports),
            ),
        ),
        OpKernels(
            "linear",
            linear_ref,
            (
                _cpu(),
                Impl("cuda", "cuBLAS (aten.linear)", "always", _always, linear_ref),
                Impl("npu", "aten.linear (CANN matmul)", "always", _always, linear_ref),
            ),
        ),
        # quantized matmuls: a CPU kernel only (xllm-compile refuses --quant for other devices)
        OpKernels("linear_q", linear_q_ref, (_cpu(),)),
    ]
    for op in ops:  # the reference closes every backend's list
        object.__setattr__(op, "impls", (*op.impls, *(_ref(b) for b in BACKENDS)))
    return {op.name: op for op in ops}


def _npu_rotary_supports(q, k, cos, sin, is_neox=True) -> str | None:
    if not is_neox:
        return "npu_rotary_mul rotates halves; interleaved pairs take the reference"
    if cos.shape[-1] != q.shape[-1]:
        return "npu_rotary_mul takes full-width tables"
    return None


def _npu_attention_supports(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens,
                            scale, sliding_window) -> str | None:  # fmt: skip
    if sliding_window > 0:
        return "a sliding window takes the reference"
    return None


def choose(op: str, backend: str) -> tuple[Impl, list[tuple[Impl, str]]]:
    """The implementation `op` gets on `backend` on this machine (before operand checks), and
    each one passed over with why."""
    skipped = []
    for impl in registry()[op].for_backend(backend):
        why = impl.unavailable()
        if why is None:
            return impl, skipped
        skipped.append((impl, why))
    raise AssertionError("the reference is always available")


def register(backend: str, names: tuple[str, ...]) -> None:
    """Put `dispatch(name, backend, ...)` on `backend`'s dispatch key for each op (the CUDA
    bindings at import; the npu ones once torch_npu has named its key)."""
    for name in names:
        importlib.import_module(f"xllm_compile.kernels.{name}")  # defines torch.ops.xllm.<name>
        op = getattr(torch.ops.xllm, name).default

        def kernel(*args, _name=name, **kwargs):
            return dispatch(_name, backend, *args, **kwargs)

        torch.library.register_kernel(op, backend, kernel)


def dispatch(op: str, backend: str, *args, **kwargs):
    """Run `op` on `backend`: the first implementation available here that takes these operands
    (the reference, at the latest)."""
    entry = registry()[op]
    for impl in entry.for_backend(backend):
        if impl.unavailable() is not None:
            continue
        if impl.supports is not None and impl.supports(*args, **kwargs) is not None:
            continue
        return (impl.fn or entry.reference)(*args, **kwargs)
    return entry.reference(*args, **kwargs)


def table() -> list[dict]:
    """Every op x backend on this machine: what runs, its condition, and the fallbacks taken."""
    rows = []
    for name in registry():
        for backend in BACKENDS:
            impl, skipped = choose(name, backend)
            rows.append(
                {
                    "op": name,
                    "backend": backend,
                    "runs": impl.name,
                    "requires": impl.requires,
                    "fallbacks": [f"{i.name}: {why}" for i, why in skipped],
                }
            )
    return rows
