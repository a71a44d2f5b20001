"""quantize: weight-only int8 matmuls, chosen at compile time (`xllm-compile --quant MODE`).

Before:  y = aten.linear(x, W [N, K] float, b)
After:   y = xllm.linear_q8(x, Q [N, K] int8, S [N, K // G], b)     (kernels/linear_q8.py)

    q8_0  groups of G = 32 values per scale, fp16 scales: ggml's Q8_0 (d = fp16(amax / 127),
          q = round(w / d)), so a Q8_0 GGUF's numbers and these agree
    int8  one fp32 scale per output row (G = K): per-channel int8

Every matmul on a float weight parameter whose K divides by G is quantized, lm_head included
unless it shares its weight with the embedding (a tied head stays float: the embedding lookup
reads the float table, and a second int8 copy would cost more than it saves). Biases and every
non-matmul parameter stay float. Runs after the merges (merge_qkv / merge_gate_up quantize the
merged weight once) and before lower_ops. Stats: matmuls quantized, bytes before and after.
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import aten, is_call

MODES = {"q8_0": (32, torch.float16), "int8": (None, torch.float32)}  # group size, scale dtype


def quantize_weight(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 [N, K], scales [N, K // G]) of a float weight [N, K]."""
    group, scale_dtype = MODES[mode]
    n, k = w.shape
    group = group or k
    blocks = w.float().reshape(n, k // group, group)
    amax = blocks.abs().amax(-1, keepdim=True)
    scales = (amax / 127).to(scale_dtype)  # stored as they will be read
    d = scales.float()
    q = torch.where(d > 0, blocks / torch.where(d > 0, d, 1), 0).round().clamp(-127, 127)
    return q.to(torch.int8).reshape(n, k), scales.reshape(n, k // group)


class Quantize(Pass):
    name = "quantize"
    VERSION = 1
    description = "weight-only int8 matmuls (--quant q8_0: groups of 32, fp16 scales; int8)"
    # int8 weights move a small model's logits by ~0.3% (q8_0) to ~1% (per-row int8) of their
    # largest; past 5% something is wrong (the perplexity tests bound the real effect)
    lossy_tolerance = 5e-2

    def applies(self, ctx: PassContext) -> str | None:
        mode = getattr(ctx, "quant", "none")
        if mode in (None, "none"):
            return "--quant none"
        if mode not in MODES:
            return f"--quant {mode} has no pass"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        mode = ctx.quant
        group = MODES[mode][0]
        stats = PassStats(details={"mode": mode, "group_size": group or "row"})
        tied = _tied_head(gm, ctx)
        before = after = 0
        for node in [n for n in gm.graph.nodes if is_call(n, aten.linear.default)]:
            w_node = node.args[1]
            w = ctx.weight(w_node)
            if w is None or w.dim() != 2 or not w.is_floating_point() or w_node is tied:
                continue
            if group and w.shape[1] % group:
                continue
            qweight, scales = quantize_weight(w, mode)
            name = ctx.param_name(w_node)
            q_node = ctx.add_param(f"{name}.qweight", qweight)
            s_node = ctx.add_param(f"{name}.scales", scales)
            bias = node.args[2] if len(node.args) > 2 else None
            # retargeted in place: the node keeps its name (the program's output may be it)
            node.target = torch.ops.xllm.linear_q8.default
            node.args = (node.args[0], q_node, s_node, bias)
            if not w_node.users:
                ctx.remove_param(w_node)
            before += w.numel() * w.element_size()
            after += qweight.numel() + scales.numel() * scales.element_size()
            stats.matches += 1
        stats.count("aten.linear -> xllm::linear_q8", stats.matches)
        stats.details.update(weight_bytes_before=before, weight_bytes_after=after)
        stats.details["lm_head"] = (
            "float (tied to the embedding)" if tied is not None else "quantized"
        )
        return stats


def _tied_head(gm: fx.GraphModule, ctx: PassContext) -> fx.Node | None:
    """The weight placeholder the embedding reads, when a matmul reads it too (a tied head)."""
    for node in gm.graph.nodes:
        if is_call(node, aten.embedding.default):
            w = node.args[0]
            if any(is_call(u, aten.linear.default) for u in w.users):
                return w
    return None
