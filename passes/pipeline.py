"""The default pass order, as data, and how `--passes`/`--disable-pass` filter it.

A new pass is one new file plus one line here. Order matters where noted.
"""

from __future__ import annotations

from collections.abc import Iterable

from xllm_compile.errors import ConfigError
from xllm_compile.passes.base import Pass
from xllm_compile.passes.chunk_allreduce import ChunkAllReduce
from xllm_compile.passes.cleanup import Cleanup
from xllm_compile.passes.fuse_allreduce_norm import FuseAllReduceNorm
from xllm_compile.passes.fuse_rms_norm import FuseRMSNorm
from xllm_compile.passes.fuse_rotary import FuseRotary
from xllm_compile.passes.fuse_silu_mul import FuseSiluMul
from xllm_compile.passes.lower_ops import LowerOps
from xllm_compile.passes.merge_gate_up import MergeGateUp
from xllm_compile.passes.merge_qkv import MergeQKV
from xllm_compile.passes.microbatch_overlap import MicrobatchOverlap
from xllm_compile.passes.quantize import Quantize
from xllm_compile.passes.schedule_collectives import ScheduleCollectives

PIPELINE: tuple[type[Pass], ...] = (
    Cleanup,  # first: the fusions match the one canonical form it leaves (no no-op casts)
    FuseRMSNorm,
    MergeQKV,
    MergeGateUp,  # before fuse_silu_mul, which then reads the two halves of the merged matmul
    FuseSiluMul,
    FuseRotary,  # after merge_qkv: pairs q and k by the matmul they come from
    Quantize,  # --quant: after the merges (one merged weight quantized); skipped otherwise
    ChunkAllReduce,  # tensor parallel, off by default (OPTIONAL): matmul + all-reduce chunks
    MicrobatchOverlap,  # tensor parallel, OPTIONAL: regions with all-reduces in two halves
    FuseAllReduceNorm,  # tensor parallel, OPTIONAL: after fuse_rms_norm; unchunked ones only
    ScheduleCollectives,  # after every pass that adds collectives or independent work
    LowerOps,  # last: binds whatever xllm:: ops the passes above emitted (and aten.linear)
)


# In the pipeline's order when asked for (`--passes +chunk_allreduce`), else left out.
OPTIONAL = frozenset({ChunkAllReduce.name, MicrobatchOverlap.name, FuseAllReduceNorm.name})


def pass_names(optional: bool = False) -> list[str]:
    """The default pipeline's names in order (with `optional`: every pass)."""
    return [p.name for p in PIPELINE if optional or p.name not in OPTIONAL]


def build_pipeline(passes: Iterable[str] | None = None, disable: Iterable[str] = ()) -> list[Pass]:
    """The pipeline in its fixed order, restricted to `passes` (None: the default ones; a name
    written "+name" adds an optional pass to the defaults) minus `disable`.

    Raises:
        ConfigError: a name is not a pass (the message lists the valid ones).
    """
    passes = None if passes is None else list(passes)
    extra = {p[1:] for p in passes or () if p.startswith("+")}
    named = {p for p in passes or () if not p.startswith("+")}
    if passes is None or (extra and not named):
        wanted = set(pass_names()) | extra  # the defaults (plus any "+name")
    else:
        wanted = named | extra  # exactly these; () ("none"): no pass
    disabled = set(disable)
    unknown = sorted((wanted | disabled) - set(pass_names(optional=True)))
    if unknown:
        raise ConfigError(
            f"unknown pass {unknown[0]!r}; passes: {', '.join(pass_names(optional=True))} "
            "(or 'none'; '+name' adds an optional one)"
        )
    return [cls() for cls in PIPELINE if cls.name in wanted - disabled]


def parse_pass_list(text: str | None) -> tuple[str, ...] | None:
    """`--passes` value: None (all), "none" -> (), "a,b" -> ("a", "b")."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())
