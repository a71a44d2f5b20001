"""Activation arenas on one artifact, same run: planned arena bytes against one allocation per
buffer (naive) and the live lower bound, and decode / prefill ms/step of the arena program
against the plain program on the same inputs (interleaved, medians), with the plan's build time.

    python -m xllm_compile.tools.bench.bench_arena --model examples/tiny-llama
    python -m xllm_compile.tools.bench.bench_arena --preset qwen2.5-0.5b --batch 1 8 --prefill 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xllm_compile.passes.memory_plan import plan_memory
from xllm_compile.runtime import load
from xllm_compile.runtime.arena import build_arena_runner, make_arena
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence
from xllm_compile.tools.bench.bench_decode import PRESETS, compile_for_bench, make_preset


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def step_inputs(engine, batch: int, tokens: int, context: int) -> tuple[list, list]:
    """A decode step (tokens == 1: `batch` sequences with `context` cached positions) or a
    prefill (one sequence of `tokens` new tokens); returns (inputs, slots to free)."""
    seqs = []
    for _ in range(batch):
        seq = Sequence(list(range(3, 3 + context + tokens)), SamplingParams())
        seq.slot = engine.kv_cache.allocate(context + tokens + 1)
        seq.num_cached = context  # positions [0, context) count as cached (their KV is zeros)
        seqs.append(seq)
    rows = engine.runner.step_rows(seqs)
    return [torch.tensor(r, dtype=torch.int64) for r in rows], [s.slot for s in seqs]


@torch.inference_mode()
def compare(gm, program, params, inputs, kv, rounds: int) -> tuple[float, float]:
    """Median ms/step of the plain and the arena program, alternating call by call (and which
    goes first, round by round: the second of a pair finds warmer caches)."""
    plain, arena = [], []
    for i in range(rounds + 2):
        pair = ((gm, plain), (program, arena))
        for fn, out in pair if i % 2 else pair[::-1]:
            start = time.perf_counter()
            fn(*params, *inputs, kv)
            if i >= 2:  # the first two rounds warm up caches and oneDNN primitives
                out.append(time.perf_counter() - start)
    return 1000 * statistics.median(plain), 1000 * statistics.median(arena)


def bench_case(engine, arena, name: str, batch: int, tokens: int, context: int, rounds: int):
    gm, params = engine.runner.graph_module, engine.runner.params
    inputs, slots = step_inputs(engine, batch, tokens, context)
    kv = engine.kv_cache.tensor
    start = time.perf_counter()
    plan = plan_memory(gm, (*params, *inputs, kv))
    program = build_arena_runner(gm, plan, arena)
    build_ms = 1000 * (time.perf_counter() - start)
    with torch.inference_mode():
        (expected,) = gm(*params, *inputs, kv)
        (got,) = program(*params, *inputs, kv)
    exact = torch.equal(expected, got)
    plain_ms, arena_ms = compare(gm, program, params, inputs, kv, rounds)
    naive, bound = plan.naive_bytes, plan.live_lower_bound_bytes
    print(
        f"  {name:<18} arena {_mib(plan.arena_bytes)}  naive {_mib(naive)} "
        f"({plan.arena_bytes / naive:.2f}x)  live bound {_mib(bound)} "
        f"({plan.arena_bytes / bound:.2f}x)  nodes {plan.num_planned} planned / "
        f"{plan.num_unplanned} allocating / {plan.num_inplace} in place  build {build_ms:.0f} ms"
    )
    print(
        f"  {'':<18} plain {plain_ms:8.3f} ms/step  arena {arena_ms:8.3f} ms/step  "
        f"({arena_ms / plain_ms:.3f}x)  bit-identical {exact}"
    )
    for slot in slots:
        engine.kv_cache.free(slot)
    return program


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: examples/tiny-llama)")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    p.add_argument("--context", type=int, default=128, help="cached positions per decode seq")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            make_preset(args.preset, Path(tmp) / "m")
            if args.preset
            else Path(args.model or "examples/tiny-llama")
        )
        art = Path(tmp) / "art"
        max_len = max(args.context + 2, *args.prefill) + 1
        max_seqs = max(args.batch)
        compile_for_bench(
            model_dir,
            art,
            args.dtype,
            max_len,
            max_seqs,
            "--max-num-tokens",
            str(max(args.prefill)),
        )
        engine = load(art, max_num_seqs=max_seqs, kv_cache="contiguous")
        print(
            f"model {args.preset or model_dir}  dtype {args.dtype}  threads "
            f"{torch.get_num_threads()}  decode context {args.context}"
        )
        arena = make_arena("cpu", capacity=4 << 30)
        programs = []  # kept alive: all share the arena, as the graph cache's entries would
        for b in args.batch:
            programs.append(
                bench_case(engine, arena, f"decode batch {b}", b, 1, args.context, args.rounds)
            )
        for n in args.prefill:
            programs.append(bench_case(engine, arena, f"prefill {n} tokens", 1, n, 0, args.rounds))
        stats = arena.pool.stats()
        print(f"  one arena for all {len(programs)} programs: {_mib(stats.bytes_mapped)} mapped")
        programs.clear()
        arena.close()


if __name__ == "__main__":
    main()
