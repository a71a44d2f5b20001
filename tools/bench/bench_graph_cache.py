"""The decode graph cache on one artifact, same run: decode ms/step unbucketed eager vs each
cache backend (eager buckets, Inductor buckets, CUDA graphs on GPU; eager and CUDA graphs also
over the activation arena laid out by the artifact's plans), warm-up time per backend, the
dispatch overhead of a cache hit (lookup + padding + input copy, µs/step), and the arena's size.

    python -m xllm_compile.tools.bench.bench_graph_cache --model examples/tiny-llama
    python -m xllm_compile.tools.bench.bench_graph_cache --preset qwen2.5-0.5b --batch 1 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xllm_compile.artifact import open_artifact
from xllm_compile.buckets import pad_rows
from xllm_compile.runtime import load
from xllm_compile.runtime.loader import read_arena_plans
from xllm_compile.runtime.model_runner import attach_graph_cache
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence
from xllm_compile.tools.bench.bench_decode import (
    PRESETS,
    compile_for_bench,
    make_preset,
    time_decode,
)


@torch.inference_mode()
def decode_ms(engine, batch: int, prompt_len: int, steps: int) -> float:
    seqs = [Sequence(list(range(3, 3 + prompt_len)), SamplingParams()) for _ in range(batch)]
    for seq in seqs:
        seq.slot = engine.kv_cache.allocate(prompt_len + steps + 1)
    times = time_decode(engine, seqs, engine.run_step(seqs), steps)
    for seq in seqs:
        engine.kv_cache.free(seq.slot)
    return 1000 * statistics.median(times[2:] or times)


def dispatch_us(cache, batch: int, n: int = 2000) -> float:
    """Host cost of a hit: bucket lookup, padding and the copy into the static inputs."""
    rows = [
        [5] * batch,
        [9] * batch,
        [0] * batch,
        [0] * batch,
        [1] * batch,
        [10] * batch,
        list(range(batch)),
    ]
    key = cache.key_for(batch, 10)
    entry = cache.entries[key]
    start = time.perf_counter()
    for _ in range(n):
        cache.key_for(batch, max(rows[5]))
        padded = torch.tensor(pad_rows(rows, key, cache.pad_slot), dtype=torch.int64)
        entry.buffer.copy_(padded, non_blocking=True)
    return 1e6 * (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args(argv)
    if args.device == "cpu":
        variants = [("eager", False), ("eager", True), ("inductor", False)]
    else:
        variants = [("cuda_graph", False), ("cuda_graph", True)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_preset(args.preset, Path(tmp) / "m")
        art = Path(tmp) / "art"
        max_len = args.prompt_len + args.steps + 8
        compile_for_bench(
            model_dir, art, args.dtype, max_len, max(args.batch) + 1, "--device", args.device
        )
        print(
            f"model {args.model or args.preset}  dtype {args.dtype}  device {args.device}  "
            f"threads {torch.get_num_threads()}  kv length <= {max_len}"
        )
        plain = load(art, max_num_seqs=max(args.batch) + 1)
        base = {b: decode_ms(plain, b, args.prompt_len, args.steps) for b in args.batch}
        for b in args.batch:
            print(f"  unbucketed eager  batch {b:>3}: {base[b]:8.2f} ms/step")
        for backend, arena in variants:
            name = backend + ("+arena" if arena else "")
            engine = load(art, max_num_seqs=max(args.batch) + 1)
            start = time.perf_counter()
            cache = attach_graph_cache(
                engine,
                warmup=True,
                max_num_seqs=max(args.batch),
                backend=backend,
                buckets=engine.manifest.get("buckets"),
                arena_plans=read_arena_plans(open_artifact(art), engine.runner.graph_module)
                if arena
                else None,
                arena=arena,
            )
            warm = time.perf_counter() - start
            extra = f", arena {cache.arena_bytes / 2**20:.2f} MiB" if arena else ""
            print(
                f"  {name}: warm-up {warm:.1f} s for {cache.stats.builds} buckets, "
                f"hit dispatch {dispatch_us(cache, args.batch[0]):.1f} µs/step{extra}"
            )
            for b in args.batch:
                ms = decode_ms(engine, b, args.prompt_len, args.steps)
                print(
                    f"  {name:>16} batch {b:>3}: {ms:8.2f} ms/step  "
                    f"({ms / base[b]:.2f}x unbucketed)"
                )
            assert cache.stats.builds == len(cache.entries)  # no build after warm-up


if __name__ == "__main__":
    main()
