"""The program a step runs: one per overlap variant of a `--tp` artifact compiled with `--overlap
auto` (xllm_compile/overlap.py), picked by the step's token count from the manifest's table —
the same on every rank, since every rank sees the same sizes. Every other artifact has one
program, run for every step. Counts the steps each variant ran (`runs`)."""

from __future__ import annotations

from collections import Counter

import torch

from xllm_compile.buckets import select_variant
from xllm_compile.errors import ArtifactError

BASE = "base"


class StepPrograms:
    def __init__(self, base: torch.fx.GraphModule, variants: dict | None = None, table=None):
        self.modules = {BASE: base, **(variants or {})}
        self.table = table or [[None, BASE]]
        missing = {v for _, v in self.table} - set(self.modules)
        if missing:
            raise ArtifactError(
                f"the overlap table names program variant {sorted(missing)[0]!r}, which the "
                "artifact does not hold; recompile the model"
            )
        self.runs: Counter[str] = Counter()

    @property
    def base(self) -> torch.fx.GraphModule:
        return self.modules[BASE]

    def variant_for(self, num_tokens: int) -> str:
        return select_variant(self.table, num_tokens)

    def for_tokens(self, num_tokens: int) -> torch.fx.GraphModule:
        """The program of a step of `num_tokens` tokens (counted as run)."""
        variant = select_variant(self.table, num_tokens)
        self.runs[variant] += 1
        return self.modules[variant]

    def __iter__(self):
        return iter(self.modules.values())
