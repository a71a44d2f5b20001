"""lower_ops' matmul lowering: aten.linear -> xllm::linear on CPU for fp32/bf16 (with and
without bias, on the token counts the kernel takes and beyond); fp16 and other devices keep
aten.linear."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import count_ops, export, run_passes, tolerance
from torch import nn

xllm, aten = torch.ops.xllm, torch.ops.aten


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 48), nn.Linear(48, 16, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 8, 40])
def test_linears_use_the_kernel(dtype, num_tokens):
    torch.manual_seed(0)
    ep = export(MLP().to(dtype), torch.randn(4, 32, dtype=dtype))
    inputs = (torch.randn(num_tokens, 32, dtype=dtype),)
    [rec], ctx, err = run_passes(ep, ["lower_ops"], inputs, dtype)
    assert err < tolerance(dtype)
    replaced = rec["stats"]["replaced"]
    assert replaced["aten.linear -> xllm::linear"] == 2 and replaced["cpu kernel"] == 1
    assert rec["stats"]["details"]["bindings"] == {"xllm::linear": "cpu kernel"}
    assert count_ops(ctx.gm, xllm.linear) == 2 and count_ops(ctx.gm, aten.linear) == 0


def test_fp16_and_other_devices_keep_aten():
    ep = export(MLP().half(), torch.randn(4, 32, dtype=torch.float16))
    [rec], ctx, _ = run_passes(ep, ["lower_ops"], (torch.randn(3, 32).half(),), torch.float16)
    assert rec["stats"]["details"]["linear_kept"] == 2 and count_ops(ctx.gm, aten.linear) == 2
    ep = export(MLP(), torch.randn(4, 32))
    [rec], ctx, _ = run_passes(ep, ["lower_ops"], (torch.randn(3, 32),), device="cuda")
    # on cuda nothing is rewritten (matmuls stay with cuBLAS); the registry's bindings are kept
    assert not rec["skipped"] and count_ops(ctx.gm, aten.linear) == 2
    assert rec["stats"]["details"]["bindings"] == {}  # an MLP calls no xllm:: op
