"""The default pass order, as data, and how `--passes`/`--disable-pass` filter it.

A new pass is one new file plus one line here. Order matters where noted.
"""

from __future__ import annotations

from collections.abc import Iterable

from xllm_compile.errors import ConfigError
from xllm_compile.passes.base import Pass
from xllm_compile.passes.cleanup import Cleanup
from xllm_compile.passes.fuse_rms_norm import FuseRMSNorm
from xllm_compile.passes.fuse_rotary import FuseRotary
from xllm_compile.passes.fuse_silu_mul import FuseSiluMul
from xllm_compile.passes.lower_ops import LowerOps
from xllm_compile.passes.merge_gate_up import MergeGateUp
from xllm_compile.passes.merge_qkv import MergeQKV

PIPELINE: tuple[type[Pass], ...] = (
    Cleanup,  # first: the fusions match the one canonical form it leaves (no no-op casts)
    FuseRMSNorm,
    MergeQKV,
    MergeGateUp,  # before fuse_silu_mul, which then reads the two halves of the merged matmul
    FuseSiluMul,
    FuseRotary,  # after merge_qkv: pairs q and k by the matmul they come from
    LowerOps,  # last: binds whatever xllm:: ops the passes above emitted (and aten.linear)
)


def pass_names() -> list[str]:
    return [p.name for p in PIPELINE]


def build_pipeline(passes: Iterable[str] | None = None, disable: Iterable[str] = ()) -> list[Pass]:
    """The pipeline in its fixed order, restricted to `passes` (None: all) minus `disable`.

    Raises:
        ConfigError: a name is not a pass (the message lists the valid ones).
    """
    wanted = set(pass_names()) if passes is None else set(passes)
    disabled = set(disable)
    unknown = sorted((wanted | disabled) - set(pass_names()))
    if unknown:
        raise ConfigError(
            f"unknown pass {unknown[0]!r}; passes: {', '.join(pass_names())} (or 'none')"
        )
    return [cls() for cls in PIPELINE if cls.name in wanted - disabled]


def parse_pass_list(text: str | None) -> tuple[str, ...] | None:
    """`--passes` value: None (all), "none" -> (), "a,b" -> ("a", "b")."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())
