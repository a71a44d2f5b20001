"""Helpers for pass tests: export a small module with a symbolic token dim, run passes on it
with verification, and compare the graph's numbers before and after."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.export import Dim

from xllm_compile.passes import PassContext, PassManager, build_pipeline, run_graph
from xllm_compile.passes.graph_utils import count_ops
from xllm_compile.trace import strip_metadata_asserts

__all__ = ["count_ops", "export", "group_fixture", "run_passes", "tolerance"]


@pytest.fixture(scope="module", name="group")
def group_fixture():
    """A one-rank gloo group's name (an all-reduce over it is the identity), or the group
    another test module left initialized. A fixture: import it into the test module."""
    if dist.is_initialized():
        yield dist.group.WORLD.group_name
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    dist.destroy_process_group()


def export(module: torch.nn.Module, *inputs: torch.Tensor, token_inputs: int | None = None):
    """Export with dim 0 of the first `token_inputs` inputs (default all) symbolic."""
    tokens = Dim("num_tokens", min=1, max=4096)
    n = len(inputs) if token_inputs is None else token_inputs
    shapes = tuple({0: tokens} if i < n else None for i in range(len(inputs)))
    with torch.no_grad():
        ep = torch.export.export(module.eval(), inputs, dynamic_shapes=shapes)
    strip_metadata_asserts(ep)  # as trace.export_model does
    return ep


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]


def run_passes(ep, names: list[str], inputs: tuple, dtype=torch.float32, device="cpu"):
    """Run `names` (pipeline order) on `ep` in place with verification on `inputs`.

    Returns (records, ctx, max relative error of the outputs against the graph before)."""
    ctx = PassContext.from_exported(ep, inputs, dtype=dtype, device=device)
    before = run_graph(ctx)
    records = PassManager(build_pipeline(names), verify=True).run(ctx)
    after = run_graph(ctx)
    err = 0.0
    for (_, a), (_, b) in zip(after, before, strict=True):
        if b.is_floating_point():
            err = max(err, float((a.float() - b.float()).abs().max() / b.float().abs().max()))
        else:
            assert torch.equal(a, b)
    return records, ctx, err
