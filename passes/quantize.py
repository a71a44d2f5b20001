"""quantize: weight-only low-bit matmuls over ggml's blocks, chosen at compile time (`--quant`).

Before:  y = aten.linear(x, W [N, K] float, b)
After:   y = xllm.linear_q(x, Q [N, row_bytes] uint8, "q4_1", b)       (kernels/linear_q.py)

    keep   a GGUF's own blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) as they are: no float round trip,
           the numbers transformers' GGUF loader dequantizes (ctx.blocks, from the GGUF reader);
           matrices the GGUF stores in a float type stay float
    q8_0 / q4_0 / q4_1   quantized here as ggml's reference quantizers do (llama-quantize's
           numbers for the same float weights)
    int8   = q8_0 blocks (group 32, symmetric)
    int4   = q4_1 blocks (group 32, scale and min), each block's range searched for the least
           squared error instead of q4_1's plain min/max

Every matmul on a float weight parameter whose K divides by 32 is quantized. lm_head: a tied
head (the embedding's table) gets a quantized copy for the matmul while the embedding keeps the
float table (its lookup reads a few rows a step; the head reads all of it): with keep, the
GGUF's token_embd blocks; otherwise q8_0 for the 4-bit modes (the logits are the most
sensitive matmul: llama.cpp keeps its output matrix at 6-8 bits too) and the mode's own format
for q8_0/int8. Biases and non-matmul parameters stay float. Runs after the merges (one merged
weight quantized once; with keep, merge_qkv / merge_gate_up concatenate blocks of one format and
leave differently stored siblings apart) and before lower_ops. Stats: matmuls per format, bytes
before and after.
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.kernels.linear_q import FORMATS, quantize, regroup
from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.match import aten, is_call

# --quant mode -> (block format, quantizer search, lm_head's format when the head is tied)
MODES = {
    "q8_0": ("q8_0", False, "q8_0"),
    "q4_0": ("q4_0", False, "q8_0"),
    "q4_1": ("q4_1", False, "q8_0"),
    "int8": ("q8_0", False, "q8_0"),
    "int4": ("q4_1", True, "q8_0"),
    "keep": (None, False, None),
}
GROUP = 32


class Quantize(Pass):
    name = "quantize"
    VERSION = 2
    description = "weight-only low-bit matmuls over ggml blocks (--quant keep, q4_1, ...)"
    # 8-bit weights move a small model's logits by ~0.3% of their largest, 4-bit ones by a few
    # percent; past 15% something is wrong (the perplexity tests bound the real effect)
    lossy_tolerance = 1.5e-1

    def applies(self, ctx: PassContext) -> str | None:
        mode = getattr(ctx, "quant", "none")
        if mode in (None, "none"):
            return "--quant none"
        if mode not in MODES:
            return f"--quant {mode} has no pass"
        if mode == "keep" and not ctx.blocks:
            return "--quant keep: the model has no quantized blocks (not a quantized GGUF)"
        return None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassStats:
        mode = ctx.quant
        fmt, search, head_fmt = MODES[mode]
        stats = PassStats(details={"mode": mode})
        tied = _tied_head(gm)
        before = after = 0
        kept_float: list[str] = []
        for node in [n for n in gm.graph.nodes if is_call(n, aten.linear.default)]:
            w_node = node.args[1]
            w = ctx.weight(w_node)
            if w is None or w.dim() != 2 or not w.is_floating_point():
                continue
            name = ctx.param_name(w_node)
            if mode == "keep":
                if name not in ctx.blocks:
                    kept_float.append(name)
                    continue
                qtype, q = ctx.blocks[name]
                q = regroup(q, qtype)  # the same bytes in the kernel's row order
            else:
                qtype = head_fmt if w_node is tied else fmt
                if w.shape[1] % GROUP:
                    kept_float.append(name)
                    continue
                q = quantize(w, qtype, search=search and qtype == "q4_1")
            head = w_node is tied
            q_node = ctx.add_param(f"{'lm_head.weight' if head else name}.{qtype}", q)
            bias = node.args[2] if len(node.args) > 2 else None
            # retargeted in place: the node keeps its name (the program's output may be it)
            node.target = torch.ops.xllm.linear_q.default
            node.args = (node.args[0], q_node, qtype, bias)
            if not w_node.users:
                ctx.remove_param(w_node)
            before += w.numel() * w.element_size()
            after += q.numel()
            stats.matches += 1
            stats.count(f"aten.linear -> xllm::linear_q {qtype}")
            if head:
                stats.details["lm_head"] = f"{qtype} copy of the tied embedding (lookup: float)"
        stats.details.update(weight_bytes_before=before, weight_bytes_after=after)
        if kept_float:
            stats.details["kept_float"] = kept_float
        stats.details.setdefault("lm_head", "quantized" if tied is None else "float")
        return stats


def _tied_head(gm: fx.GraphModule) -> fx.Node | None:
    """The weight placeholder the embedding reads, when a matmul reads it too (a tied head)."""
    for node in gm.graph.nodes:
        if is_call(node, aten.embedding.default):
            w = node.args[0]
            if any(is_call(u, aten.linear.default) for u in w.users):
                return w
    return None


def formats_doc() -> dict[str, str]:
    """The manifest's description of each block format (kernels/linear_q.py)."""
    return {
        q: f"{block} values in {nbytes} bytes a block, ggml's layout"
        for q, (block, nbytes) in FORMATS.items()
    }
