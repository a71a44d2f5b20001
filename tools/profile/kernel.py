"""`xllm profile kernel NAME`: one `xllm::` kernel against its reference implementation (the
plain-torch composition the fusion replaced, `kernels/<op>.py`'s *_ref): max error against the
reference computed in fp32 from the same inputs, time of each, and achieved bandwidth (bytes read
and written / time) against this machine's copy ceiling (ceilings.py).

Shapes are 'x'-joined sizes, several separated by commas:
    rms_norm, fused_add_rms_norm   TxH             (default 1x576,128x576)
    silu_and_mul                   TxI             (the gate and up halves: I each)
    rotary_embedding               TxHxHkvxD
    linear                         MxNxK           (x [M, K] @ W[N, K]^T)
    linear_q                       MxNxK  (--qtype q4_1 ...)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import xllm_compile.kernels  # noqa: F401  (registers torch.ops.xllm.*)
from xllm_compile.errors import ConfigError
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
from xllm_compile.kernels.rms_norm import rms_norm_ref
from xllm_compile.kernels.rotary_embedding import rotary_embedding_ref
from xllm_compile.kernels.silu_and_mul import silu_and_mul_ref
from xllm_compile.passes.manager import rel_err
from xllm_compile.tools.profile.table import Table

_lq = importlib.import_module("xllm_compile.kernels.linear_q")

# relative error allowed against the fp32 reference, by dtype (issue 20's, as the tests use)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
EPS = 1e-6


@dataclass(frozen=True)
class Kernel:
    """How to run one op and its reference on inputs made for a shape."""

    dims: str  # what the shape's sizes mean
    default_shapes: tuple[tuple[int, ...], ...]
    make: Callable[..., tuple]  # (shape, dtype, generator, **opts) -> args
    op: Callable[..., Any]
    ref: Callable[..., Any]
    flops: Callable[[tuple[int, ...]], float] | None = None
    tolerance: float | None = None  # instead of the dtype's (lossy formats)


def _rand(g, dtype, *shape):
    return torch.randn(*shape, generator=g).to(dtype)


def _make_linear_q(shape, dtype, g, qtype="q4_1"):
    m, n, k = shape
    w = torch.randn(n, k, generator=g) * 0.05
    return _rand(g, dtype, m, k), _lq.quantize(w, qtype), qtype


KERNELS: dict[str, Kernel] = {
    "rms_norm": Kernel(
        "TxH",
        ((1, 576), (128, 576)),
        lambda s, dt, g: (_rand(g, dt, *s), _rand(g, dt, s[1]), EPS),
        lambda x, w, eps: torch.ops.xllm.rms_norm(x, w, eps),
        rms_norm_ref,
    ),
    "fused_add_rms_norm": Kernel(
        "TxH",
        ((1, 576), (128, 576)),
        lambda s, dt, g: (_rand(g, dt, *s), _rand(g, dt, *s), _rand(g, dt, s[1]), EPS),
        lambda x, r, w, eps: torch.ops.xllm.fused_add_rms_norm(x, r, w, eps),
        fused_add_rms_norm_ref,
    ),
    "silu_and_mul": Kernel(
        "TxI",
        ((1, 1536), (128, 1536)),
        lambda s, dt, g: tuple(_rand(g, dt, s[0], 2 * s[1]).chunk(2, dim=-1)),
        lambda gate, up: torch.ops.xllm.silu_and_mul(gate, up),
        silu_and_mul_ref,
    ),
    "rotary_embedding": Kernel(
        "TxHxHkvxD",
        ((1, 9, 3, 64), (128, 9, 3, 64)),
        lambda s, dt, g: (
            _rand(g, dt, s[0], s[1], s[3]),
            _rand(g, dt, s[0], s[2], s[3]),
            _rand(g, dt, s[0], 1, s[3]),
            _rand(g, dt, s[0], 1, s[3]),
        ),
        lambda q, k, c, s: torch.ops.xllm.rotary_embedding(q, k, c, s, True),
        lambda q, k, c, s: rotary_embedding_ref(q, k, c, s, True),
    ),
    "linear": Kernel(
        "MxNxK",
        ((1, 1536, 576), (16, 1536, 576), (128, 1536, 576)),
        lambda s, dt, g: (_rand(g, dt, s[0], s[2]), _rand(g, dt, s[1], s[2]) * 0.05),
        lambda x, w: torch.ops.xllm.linear(x, w),
        F.linear,
        flops=lambda s: 2.0 * s[0] * s[1] * s[2],
    ),
    "linear_q": Kernel(
        "MxNxK",
        ((1, 1536, 576), (16, 1536, 576), (128, 1536, 576)),
        _make_linear_q,
        lambda x, w, qtype: torch.ops.xllm.linear_q(x, w, qtype),
        lambda x, w, qtype: F.linear(x, _lq.dequantize(w, qtype).to(x.dtype)),
        flops=lambda s: 2.0 * s[0] * s[1] * s[2],
        # the integer path quantizes activations to ~24 bits: the fp32 reference to ~1e-6
        tolerance=1e-4,
    ),
}


def parse_shapes(text: str | None, name: str) -> list[tuple[int, ...]]:
    spec = KERNELS[name]
    if not text:
        return list(spec.default_shapes)
    want = len(spec.dims.split("x"))
    shapes = []
    for part in text.replace(" ", "").split(","):
        try:
            shape = tuple(int(v) for v in part.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != want or min(shape) < 1:
            raise ConfigError(f"--shapes {part!r}: {name} takes {spec.dims} (e.g. 1x576)")
        shapes.append(shape)
    return shapes


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


def nbytes(args, out) -> int:
    """Bytes the call reads (its tensor inputs) and writes (its outputs)."""
    return sum(t.numel() * t.element_size() for t in _tensors(list(args)) + _tensors(out))


def max_rel_err(out, ref) -> float:
    pairs = zip(_tensors(out), _tensors(ref), strict=True)
    return max((rel_err(o, r) for o, r in pairs), default=0.0)


def _fp32(args):
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def profile_kernel(
    name: str,
    shapes: list[tuple[int, ...]] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    qtype: str = "q4_1",
    min_time: float = 0.05,
) -> dict[str, Any]:
    """Returns {"rows": [...], "table": Table, "tolerance": float, "ceiling_gb_s": float}."""
    from xllm_compile.backend import check_device
    from xllm_compile.tools.bench.bench_kernels import _us
    from xllm_compile.tools.profile import ceilings

    if name not in KERNELS:
        raise ConfigError(f"no kernel {name!r}; kernels: {', '.join(KERNELS)}")
    check_device(device)
    spec = KERNELS[name]
    torch_dtype = getattr(torch, dtype)
    if name == "linear_q" and qtype not in _lq.FORMATS:
        raise ConfigError(f"--qtype {qtype!r}: one of {', '.join(_lq.FORMATS)}")
    opts = {"qtype": qtype} if name == "linear_q" else {}
    tol = spec.tolerance or TOLERANCE.get(torch_dtype, 1e-5)
    ceiling = ceilings.measure(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes or list(spec.default_shapes):
        args = spec.make(shape, torch_dtype, g, **opts)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        out = spec.op(*args)
        ref32 = spec.ref(*_fp32(args))  # the reference, in fp32 from the same inputs
        err = max_rel_err(out, ref32)
        t_op = _us(lambda a=args: spec.op(*a), min_time)
        t_ref = _us(lambda a=args: spec.ref(*a), min_time)  # the unfused ops in the same dtype
        moved = nbytes(args, out)
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "max_rel_err": err,
                "ok": err <= tol,
                "kernel_us": t_op,
                "reference_us": t_ref,
                "speedup": t_ref / t_op if t_op else None,
                "bytes": moved,
                "gb_s": moved / t_op / 1e3 if t_op else None,
                "of_copy_bw": moved / t_op / 1e3 / ceiling["copy_gb_s"] if t_op else None,
                "gflop_s": spec.flops(shape) / t_op / 1e3 if spec.flops and t_op else None,
            }
        )
    suffix = f" {qtype}" if opts else ""
    table = Table(
        f"kernel xllm::{name}{suffix} ({dtype}, {device}) against its reference",
        [
            spec.dims,
            "max rel err",
            "ok",
            "kernel us",
            "reference us",
            "speedup",
            "GB/s",
            "of copy bw",
            "GFLOP/s",
        ],  # fmt: skip
    )
    for r in rows:
        table.add(
            r["shape"], r["max_rel_err"], "yes" if r["ok"] else "NO", r["kernel_us"],
            r["reference_us"], r["speedup"], r["gb_s"], r["of_copy_bw"], r["gflop_s"],
        )  # fmt: skip
    table.notes.append(
        f"error: max |kernel - reference in fp32| / max |reference|; tolerance {tol:g}. "
        f"copy ceiling {ceiling['copy_gb_s']:.1f} GB/s ({ceiling['threads']} threads; "
        "ceilings.py, cached)"
    )
    return {"rows": rows, "table": table, "tolerance": tol, "ceiling": ceiling}
