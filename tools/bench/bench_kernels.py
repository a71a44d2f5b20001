"""Microbenchmark of each fused `xllm::` op's CPU kernel against the unfused ATen sequence it
replaces (what torch.export traced from the model, run op by op), same inputs, same run.

    python -m xllm_compile.tools.bench.bench_kernels --model smollm2 qwen2.5 \\
        --tokens 1 8 32 128 512 2048 --dtype float32 bfloat16

Inputs are laid out as the compiled graph passes them: gate/up are the two halves of the merged
gate_up matmul output [T, 2I], q/k views of the merged qkv output, cos/sin [T, 1, D] gathered by
position. Each fused op is timed through `torch.ops.xllm.<op>.default` (the call the graph
makes, dispatcher included); the unfused sequence through eager torch calls, the cheapest way to
run it from Python (the graph's `torch.ops.aten.*` calls cost ~0.3-0.6 us more per op).
"rotary_interleaved" is the GPT-J pairing (is_neox=False).

"linear" is measured as a decode step reads weights: xllm::linear against F.linear over every
layer's distinct matrices (qkv, o, gate_up, down: too many bytes for any cache), T rows each,
in ms per pass and GB/s of weights, next to a sum over as many bytes (the memory-bandwidth
floor of one pass):

    python -m xllm_compile.tools.bench.bench_kernels --ops linear --model smollm2 qwen2.5 \
        --tokens 1 2 4 8 16 32 --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import xllm_compile.kernels  # noqa: F401  (registers torch.ops.xllm.*)
from xllm_compile.kernels.cpu import ensure_loaded
from xllm_compile.kernels.fused_add_rms_norm import fused_add_rms_norm_ref
from xllm_compile.kernels.rms_norm import rms_norm_ref
from xllm_compile.kernels.rotary_embedding import rotate_half, rotate_interleaved


@dataclass(frozen=True)
class Shapes:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 64
    num_layers: int = 24


MODELS = {
    "smollm2": Shapes(576, 1536, 9, 3, num_layers=30),  # SmolLM2-135M
    "qwen2.5": Shapes(896, 4864, 14, 2, num_layers=24),  # Qwen2.5-0.5B
}
FUSED = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "rotary_interleaved")
OPS = (*FUSED, "linear")


def _us(fn, min_time: float = 0.05, repeats: int = 5) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(repeats):  # best of: other processes on the machine only ever add time
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time:
            for _ in range(5):
                fn()
            n += 5
        best = min(best, 1e6 * elapsed / n)
    return best


def cases(tokens: int, dtype: torch.dtype, s: Shapes) -> dict:
    """op name -> (fused call, unfused call)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    x, res, w = rand(tokens, s.hidden_size), rand(tokens, s.hidden_size), rand(s.hidden_size)
    inter = s.intermediate_size
    gate_up = rand(tokens, 2 * inter)  # merged gate_up output; gate and up are strided halves
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    heads, kv_heads, d = s.num_heads, s.num_kv_heads, s.head_dim
    qkv = rand(tokens, (heads + 2 * kv_heads) * d)  # merged qkv output
    q = qkv[:, : heads * d].view(tokens, heads, d)  # [T, H, D]
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)  # [T, Hkv, D]
    cos, sin = rand(tokens, 1, d), rand(tokens, 1, d)  # [T, 1, D]
    rms, add_rms = torch.ops.xllm.rms_norm.default, torch.ops.xllm.fused_add_rms_norm.default
    silu_mul, rotary = torch.ops.xllm.silu_and_mul.default, torch.ops.xllm.rotary_embedding.default

    def rope(rotate):
        return lambda: (q * cos + rotate(q) * sin, k * cos + rotate(k) * sin)

    return {
        "rms_norm": (lambda: rms(x, w, 1e-6), lambda: rms_norm_ref(x, w, 1e-6)),
        "fused_add_rms_norm": (
            lambda: add_rms(x, res, w, 1e-6),
            lambda: fused_add_rms_norm_ref(x, res, w, 1e-6),
        ),
        "silu_and_mul": (lambda: silu_mul(gate, up), lambda: F.silu(gate) * up),
        "rotary_embedding": (lambda: rotary(q, k, cos, sin), rope(rotate_half)),
        "rotary_interleaved": (
            lambda: rotary(q, k, cos, sin, False),
            rope(rotate_interleaved),
        ),
    }


def _ms(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, 1e3 * (time.perf_counter() - start))
    return best


def bench_linear(models, dtypes, tokens) -> None:
    """xllm::linear vs F.linear over a whole model's distinct weights, and the bandwidth floor."""
    print("linear: ms per pass over every layer's weights (best of 3); ratio = xllm / F.linear")
    print(
        f"{'model':>8} {'dtype':>9} {'T':>4} {'xllm':>8} {'F.linear':>9} {'ratio':>6} "
        f"{'xllm GB/s':>9} {'aten GB/s':>9} {'floor ms':>8}"
    )
    for model in models:
        s = MODELS[model]
        d, h = s.head_dim, s.hidden_size
        shapes = [((s.num_heads + 2 * s.num_kv_heads) * d, h), (h, s.num_heads * d)]
        shapes += [(2 * s.intermediate_size, h), (h, s.intermediate_size)]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            ws = [torch.randn(o, i).to(dtype) for _ in range(s.num_layers) for o, i in shapes]
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            flat = torch.randn(nbytes // 4)  # as many bytes, for the floor
            floor = _ms(flat.sum)
            for t in tokens:
                xs = {i: torch.randn(t, i).to(dtype) for _, i in shapes}

                def run(fn, ws=ws, xs=xs):
                    for w in ws:
                        fn(xs[w.shape[1]], w)

                a = _ms(lambda: run(torch.ops.xllm.linear.default))  # noqa: B023
                b = _ms(lambda: run(F.linear))  # noqa: B023
                print(
                    f"{model:>8} {dtype_name:>9} {t:>4} {a:>8.2f} {b:>9.2f} {a / b:>5.2f}x "
                    f"{nbytes / a / 1e6:>9.1f} {nbytes / b / 1e6:>9.1f} {floor:>8.2f}",
                    flush=True,
                )
            del ws, flat


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["qwen2.5"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 2048])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(FUSED))
    args = p.parse_args(argv)
    why_not = ensure_loaded()
    kernel = "C++ CPU kernels" if why_not is None else f"reference ({why_not})"
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"threads {torch.get_num_threads()}  capability {capability}")
    print(f"fused: {kernel}")
    if any(o != "linear" for o in args.ops):
        print("us per call, best of 5; ratio = fused / unfused (below 1: the fused op is faster)")
        print(
            f"{'op':>18} {'model':>8} {'dtype':>9} {'T':>5} {'fused':>9} {'unfused':>9} "
            f"{'ratio':>6}"
        )
    with torch.inference_mode():
        if "linear" in args.ops:
            bench_linear(args.model, args.dtype, args.tokens)
        for name in [o for o in args.ops if o != "linear"]:
            for model in args.model:
                for dtype_name in args.dtype:
                    for t in args.tokens:
                        table = cases(t, getattr(torch, dtype_name), MODELS[model])
                        fused, unfused = table[name]
                        a, b = _us(fused), _us(unfused)
                        print(
                            f"{name:>18} {model:>8} {dtype_name:>9} {t:>5} "
                            f"{a:>9.1f} {b:>9.1f} {a / b:>5.2f}x",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
