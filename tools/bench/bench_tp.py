"""Tensor-parallel step time on this machine: TP=1 against TP=2, and TP=2 with the chunked
matmul + all-reduce (scheduled so each chunk's collective runs while the next chunk computes),
decode and prefill, same weights, same run; with the measured time of the step's all-reduces
(a 2-process gloo group timing all_reduce of the same sizes) and the share of it hidden.

    python -m xllm_compile.tools.bench.bench_tp --gguf "$(xllm pull smollm2)"
    python -m xllm_compile.tools.bench.bench_tp --preset qwen2.5-0.5b --batch 1 8 --prompt-len 256

Hidden share = (TP=2 step - TP=2 chunked step) / communication time: what the overlap won back
of the time the collectives take. No cost model predicts these yet (the issue's next step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from xllm_compile.runtime import load
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence
from xllm_compile.tools.bench.bench_decode import PRESETS, _timed, compile_for_bench, make_preset

VARIANTS = ("tp1", "tpN", "tpN+chunks")


def variant_args(name: str, tp: int) -> tuple[str, ...]:
    return {
        "tp1": (),
        "tpN": ("--tp", str(tp)),
        "tpN+chunks": ("--tp", str(tp), "--passes", "+chunk_allreduce"),
    }[name]


ALL_REDUCE_TIMER = """
import json, statistics, sys, time, torch, torch.distributed as dist
rank, port, world, threads = (int(a) for a in sys.argv[1:5])
sizes = json.loads(sys.argv[5])
torch.set_num_threads(threads)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
out = {}
for n in sizes:
    x = torch.randn(n)
    for _ in range(5):
        dist.all_reduce(x)
    times = []
    for _ in range(50):
        start = time.perf_counter(); dist.all_reduce(x); times.append(time.perf_counter() - start)
    out[n] = 1e3 * statistics.median(times)
if rank == 0:
    print(json.dumps(out))
dist.destroy_process_group()
"""


def all_reduce_ms(numels: list[int], world: int, threads: int) -> dict[int, float]:
    """Median ms of one gloo all_reduce of each size (fp32 elements) among `world` processes."""
    from xllm_compile.runtime.tp_group import free_port

    port, sizes = free_port(), json.dumps(numels)
    cmd = [sys.executable, "-c", ALL_REDUCE_TIMER]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), str(port), str(world), str(threads), sizes], stdout=subprocess.PIPE
        )
        for r in range(world)
    ]
    out = procs[0].communicate(timeout=300)[0]
    for proc in procs[1:]:
        proc.wait(timeout=60)
    return {int(k): v for k, v in json.loads(out).items()}


@torch.inference_mode()
def time_steps(art: Path, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    """(prefill ms, decode ms/step, medians) of `batch` sequences through the artifact."""
    with load(art, max_num_seqs=batch) as engine:
        vocab = engine.manifest["model"]["config"]["vocab_size"]
        prefills, decodes = [], []
        for _ in range(3):
            seqs = [
                Sequence(torch.randint(3, vocab, (prompt_len,)).tolist(), SamplingParams())
                for _ in range(batch)
            ]
            for seq in seqs:
                seq.slot = engine.kv_cache.allocate(prompt_len + steps + 1)
            state = {"seqs": seqs}

            def step(state=state):
                state["logits"] = engine.executor.run(state["seqs"], engine.kv_cache.tensor)

            prefills.append(_timed(step))
            for _ in range(steps):
                for seq, token in zip(seqs, state["logits"].argmax(-1).tolist(), strict=True):
                    seq.output_ids.append(token)
                decodes.append(_timed(step))  # a decode step: the same call, one token each
            for seq in seqs:
                engine.kv_cache.free(seq.slot)
        return 1e3 * statistics.median(prefills[1:]), 1e3 * statistics.median(decodes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an HF model folder")
    src.add_argument("--gguf", help="a GGUF file")
    src.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128, dest="prompt_len")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--tp", type=int, default=2, help="ranks (SmolLM2's 9 heads: 3)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.gguf:
            model_dir = Path(args.gguf)
        else:
            model_dir = Path(args.model) if args.model else make_preset(args.preset, tmp / "m")
        max_len = args.prompt_len + 4 * args.steps + 16
        arts = {
            name: compile_for_bench(
                model_dir,
                tmp / name,
                args.dtype,
                max_len,
                max(args.batch),
                *variant_args(name, args.tp),
            )
            for name in VARIANTS
        }
        config = json.loads((arts["tp1"] / "manifest.json").read_text())["model"]["config"]
        hidden, layers = config["hidden_size"], config["num_layers"]
        threads = max(1, torch.get_num_threads() // args.tp)
        print(f"model: {model_dir.name}, {layers} layers, hidden {hidden}, {args.dtype}")
        for batch in args.batch:
            numels = [batch * args.prompt_len * hidden, batch * hidden]
            comm = all_reduce_ms(numels, args.tp, threads)
            results = {
                n: time_steps(a, batch, args.prompt_len, args.steps) for n, a in arts.items()
            }
            for phase, i, numel in (("prefill", 0, numels[0]), ("decode", 1, numels[1])):
                comm_ms = 2 * layers * comm[numel]  # o_proj and down_proj of every layer
                base, tp2, chunked = (results[n][i] for n in VARIANTS)
                hidden_share = (tp2 - chunked) / comm_ms if comm_ms else 0.0
                print(
                    f"  B={batch:<3} {phase:<7} tp1 {base:8.2f} ms  tp{args.tp} {tp2:8.2f} ms "
                    f"({tp2 / base:4.2f}x)  +chunks {chunked:8.2f} ms ({chunked / tp2:4.2f}x)  "
                    f"all-reduce {comm_ms:7.2f} ms/step, hidden {100 * hidden_share:5.1f}%"
                )


if __name__ == "__main__":
    main()
