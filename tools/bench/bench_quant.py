"""Low-bit decode and prefill on the CPU against llama.cpp on the same GGUF, HF eager on its
dequantized weights and the memory-bandwidth floor: same machine, same run, interleaved rounds
(every peer runs once a round, the medians of the rounds are printed, with their ratios).

    python -m xllm_compile.tools.bench.bench_quant                    # SmolLM2-135M Q4_1 + Q8_0
    python -m xllm_compile.tools.bench.bench_quant --types Q4_1 --threads 1 2 --rounds 5

The GGUF is `xllm pull smollm2`'s (SmolLM2-135M-Instruct, Q4_1); the Q8_0 file is made from it
with llama-quantize --allow-requantize. llama.cpp is tools/bench/llama_cpp.py's llama-bench
(decode tg32, prefill pp128 / pp512) and llama-batched-bench, built from the llama-cpp-python
sdist on first use. Decode is timed in the peer's conditions: batch 1 from a one-token prompt
(llama-bench's tg32 starts from an empty cache), batch 1 and 8 after 128-token prompts
(llama-batched-bench -npp 128 -ntg 32 -npl 1,8). Our artifacts are compiled from the same GGUFs
with the default `--quant keep` (the GGUF's blocks as they are). Prefill, ours as llama-bench's:
a warm-up run, then the mean of two timed ones. The floor is the bytes one decode step must read
(every matmul's packed weight, the norms) over the read bandwidth measured in the same
round (a torch sum over 1 GiB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from xllm_compile.runtime.loader import DTYPE_BYTES
from xllm_compile.tools.bench import llama_cpp
from xllm_compile.tools.bench.bench_decode import bench_hf, bench_xllm, compile_for_bench


def step_bytes(art: Path) -> int:
    """Bytes a decode step reads: every weight but the embedding table (a step reads a row)."""
    total = 0
    with safe_open(str(art / "weights.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            if name.startswith("model.embed_tokens"):
                continue
            t = f.get_slice(name)
            numel = 1
            for d in t.get_shape():
                numel *= d
            total += numel * DTYPE_BYTES[t.get_dtype()]
    return total


def read_bandwidth(threads: int) -> float:
    """GB/s of a torch sum over 1 GiB of fp32 with `threads` threads (best of 3)."""
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    x.sum()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def llama_runs(gguf: Path, threads: int) -> dict:
    """llama.cpp's decode ms/step at batch 1 and 8, prefill tok/s at 128 and 512 tokens."""
    exe = llama_cpp.build()
    proc = subprocess.run(
        [str(exe), "-m", str(gguf), "-t", str(threads), "-r", "2", "-o", "json",
         "-p", "128,512", "-n", "32"],
        capture_output=True, text=True, timeout=1800, check=True,
    )  # fmt: skip
    rows = json.loads(proc.stdout)
    out = {}
    for r in rows:
        if r["n_gen"]:
            out["decode_b1_ms"] = 1000.0 / r["avg_ts"]
        else:
            out[f"prefill_{r['n_prompt']}_tok_s"] = r["avg_ts"]
    batched = llama_cpp.tool("llama-batched-bench")
    proc = subprocess.run(
        [str(batched), "-m", str(gguf), "-t", str(threads), "-c", "2048", "-b", "2048",
         "-ub", "512", "-npp", "128", "-ntg", "32", "-npl", "1,8", "--output-format", "jsonl"],
        capture_output=True, text=True, timeout=1800, check=True,
    )  # fmt: skip
    for line in proc.stdout.strip().splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        key = {1: "decode_b1_c128_ms", 8: "decode_b8_ms"}.get(row.get("pl"))
        if key:  # t_tg: seconds for the pl sequences' tg tokens each, one step a token
            out[key] = 1000.0 * row["t_tg"] / row["tg"]
    return out


def xllm_runs(art: Path, threads: int, steps: int) -> dict:
    """Decode through the graph cache (CPU graphs, the CLI's default), prefill without it."""
    torch.set_num_threads(threads)
    _, b1 = bench_xllm(art, 1, 1, steps, True)  # as llama-bench's tg32: from an empty cache
    _, b1_c128 = bench_xllm(art, 1, 128, steps, True)
    _, b8 = bench_xllm(art, 8, 128, steps, True)
    p128, _ = bench_xllm(art, 1, 128, 1, False, prefill_reps=2)  # llama-bench's -r 2
    p512, _ = bench_xllm(art, 1, 512, 1, False, prefill_reps=2)
    return {"decode_b1_ms": b1, "decode_b1_c128_ms": b1_c128, "decode_b8_ms": b8,
            "prefill_128_tok_s": p128, "prefill_512_tok_s": p512}  # fmt: skip


def hf_runs(model_dir: Path, threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    _, b1 = bench_hf(model_dir, torch.float32, 1, 1, steps, "cpu")
    p128, b1_c128 = bench_hf(model_dir, torch.float32, 1, 128, steps, "cpu")
    _, b8 = bench_hf(model_dir, torch.float32, 8, 128, steps, "cpu")
    p512, _ = bench_hf(model_dir, torch.float32, 1, 512, 1, "cpu")
    return {"decode_b1_ms": b1, "decode_b1_c128_ms": b1_c128, "decode_b8_ms": b8,
            "prefill_128_tok_s": p128, "prefill_512_tok_s": p512}  # fmt: skip


def in_child(fn, *args):
    """fn(*args) in a fresh process (spawned: nothing inherited), as llama.cpp runs, so that HF's
    model, threads and allocator state do not stay in the process whose decode is timed next."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


METRICS = (
    ("decode_b1_ms", "decode ms/step, batch 1", "ms"),  # from an empty cache (tg32)
    ("decode_b1_c128_ms", "  batch 1, 128-token prompt", "ms"),
    ("decode_b8_ms", "decode ms/step, batch 8", "ms"),
    ("prefill_128_tok_s", "prefill tok/s, 128 tokens", "tok/s"),
    ("prefill_512_tok_s", "prefill tok/s, 512 tokens", "tok/s"),
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gguf", help="a GGUF file (default: xllm pull smollm2's Q4_1)")
    p.add_argument("--types", nargs="+", default=["Q4_1", "Q8_0"], help="GGUF types to compare")
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--no-hf", action="store_true", help="leave HF eager out (it is slow)")
    args = p.parse_args(argv)

    import transformers

    from xllm_compile.gguf import gguf_to_hf_folder, open_gguf
    from xllm_compile.pull import pull

    transformers.utils.logging.disable_progress_bar()

    source = Path(args.gguf) if args.gguf else pull("smollm2", quiet=False)
    print(f"llama.cpp: {llama_cpp.build()} (llama-cpp-python {llama_cpp.VERSION} sdist, cmake)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the source's matrices' type (its most common one: token_embd may differ)
        kinds = [t.tensor_type.name for t in open_gguf(source).tensors if len(t.shape) == 2]
        stored = max(set(kinds), key=kinds.count)
        cases = {}
        for qtype in args.types:
            gguf = source
            if qtype != stored:
                gguf = llama_cpp.quantize(source, tmp / f"{qtype}.gguf", qtype)
            art = compile_for_bench(gguf, tmp / f"art-{qtype}", "float32", 1024, 8)
            hf = (
                None
                if args.no_hf
                else gguf_to_hf_folder(gguf, tmp / f"hf-{qtype}", show_progress=False)
            )
            cases[qtype] = (gguf, art, hf, step_bytes(art))
        results: dict = {}
        for rnd in range(args.rounds):
            for threads in args.threads:
                bw = read_bandwidth(threads)
                results.setdefault((threads, "bandwidth"), []).append(bw)
                for qtype, (gguf, art, hf, _) in cases.items():
                    print(
                        f"round {rnd + 1}/{args.rounds}, {threads} threads, {qtype} ...", flush=True
                    )
                    runs = {
                        "xllm": xllm_runs(art, threads, args.steps),
                        "llama.cpp": llama_runs(gguf, threads),
                    }
                    if hf is not None:
                        runs["HF eager"] = in_child(hf_runs, hf, threads, min(args.steps, 16))
                    for engine, figures in runs.items():
                        for key, value in figures.items():
                            results.setdefault((threads, qtype, engine, key), []).append(value)
        _report(results, cases, args)


def _report(results: dict, cases: dict, args) -> None:
    med = {k: statistics.median(v) for k, v in results.items()}
    for threads in args.threads:
        bw = med[(threads, "bandwidth")]
        print(f"\n{threads} threads; read bandwidth {bw:.1f} GB/s (median of {args.rounds} rounds)")
        for qtype, (_, _, _, nbytes) in cases.items():
            floor = nbytes / (bw * 1e9) * 1000
            print(f"  {qtype}: a decode step reads {nbytes / 1e6:.1f} MB -> floor {floor:.2f} ms")
            engines = [
                e
                for e in ("xllm", "llama.cpp", "HF eager")
                if (threads, qtype, e, METRICS[0][0]) in med
            ]
            print(f"    {'':28}" + "".join(f"{e:>12}" for e in engines) + "   xllm/llama.cpp")
            for key, label, unit in METRICS:
                vals = [med.get((threads, qtype, e, key)) for e in engines]
                line = f"    {label:28}" + "".join(f"{v:>12.2f}" for v in vals)
                ours, theirs = vals[0], vals[1]
                what = "llama.cpp's time" if unit == "ms" else "llama.cpp's tok/s"
                line += f"   {ours / theirs:.2f}x {what}"
                if key == "decode_b1_ms":
                    line += f"; {ours / floor:.2f}x the floor"
                print(line)


if __name__ == "__main__":
    main()
