"""Tensor-parallel step time on this machine, each overlap of compute and communication
against none, measured and predicted, decode and prefill, same weights, same run:

    tp1          one process
    none         --tp N --overlap none (schedule_collectives alone)
    chunk        --tp N --passes +chunk_allreduce (every step)
    microbatch   --tp N --passes +microbatch_overlap (every step)
    auto         --tp N (the default: the cost model's program per step size)

    python -m xllm_compile.tools.bench.bench_tp --gguf "$(xllm pull smollm2)" --tp 3
    python -m xllm_compile.tools.bench.bench_tp --preset qwen2.5-0.5b --batch 1 8 --prompt-len 256

Per step shape: the measured median, the cost model's prediction for the same program and
shape (passes/cost_model.py: the rank-0 program's nodes timed here on a one-rank group, the
all-reduces from an all-reduce profile measured in this run, plus the step's input broadcast
priced from the same profile), the communication time (the
profile's time for the step's all-reduces) and the share of it hidden: (none - variant) / comm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from xllm_compile import comm_profile, overlap, program_format
from xllm_compile.buckets import select_variant
from xllm_compile.compiler import one_rank_group
from xllm_compile.config import ModelConfig
from xllm_compile.passes.cost_model import step_cost
from xllm_compile.runtime import load
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence
from xllm_compile.tools.bench.bench_decode import PRESETS, _timed, compile_for_bench, make_preset

VARIANTS = ("tp1", "none", "chunk", "microbatch", "auto")


def variant_args(name: str, tp: int) -> tuple[str, ...]:
    n = ("--tp", str(tp))
    return {
        "tp1": (),
        "none": (*n, "--overlap", "none"),
        "chunk": (*n, "--passes", "+chunk_allreduce"),
        "microbatch": (*n, "--passes", "+microbatch_overlap"),
        "auto": n,
    }[name]


def predict(art: Path, query_lens: list[int], cached: int, profile) -> dict:
    """The cost model's StepCost of rank 0's program for this step (the program the runtime
    picks for its token count), as a dict."""
    from safetensors.torch import load_file

    manifest = json.loads((art / "manifest.json").read_text())
    config = ModelConfig.from_dict(manifest["model"]["config"])
    local = manifest["tp"]["local"]
    config = ModelConfig.from_dict({**config.to_dict(), **local})
    table = (manifest.get("overlap") or {}).get("select")
    variant = select_variant(table, sum(query_lens)) if table else "single"
    name = "program.json" if variant in ("base", "single") else overlap.variant_file(variant, 0)
    gm = program_format.load(art / name)
    weights = load_file(str(art / "weights.safetensors"))
    params = [weights[n] for n in manifest["program"]["params"]]
    dtype = next(iter(weights.values())).dtype
    args = overlap.step_args(config, query_lens, cached, dtype)
    with one_rank_group() as group:
        program_format.bind_group(gm, group)
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // manifest["tp"]["size"]))
        try:
            cost = step_cost(gm, [*params, *args], profile.all_reduce_s, 2, profile.overlap)
        finally:
            torch.set_num_threads(threads)
    # rank 0 broadcasts each step's header and inputs (runtime/tp_group.py): the same for every
    # variant, so the compiler's choice leaves it out; a prediction of the step includes it
    inputs = 8 * (3 * sum(query_lens) + 4 * len(query_lens))
    broadcast_ms = 1e3 * (profile.all_reduce_s(80) + profile.all_reduce_s(inputs))
    out = cost.to_dict()
    out["predicted_ms"] += broadcast_ms
    return {"variant": variant, **out, "broadcast_ms": broadcast_ms}


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
                state["logits"] = engine.run_step(state["seqs"])

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
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args(argv)
    names = ["tp1", "none", *(v for v in args.variants if v not in ("tp1", "none"))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.gguf:
            model_dir = Path(args.gguf)
        else:
            model_dir = Path(args.model) if args.model else make_preset(args.preset, tmp / "m")
        max_len = args.prompt_len + 4 * args.steps + 16
        profile = comm_profile.measure(args.tp)  # this run's all-reduce times
        arts = {
            name: compile_for_bench(
                model_dir,
                tmp / name,
                args.dtype,
                max_len,
                max(args.batch),
                *variant_args(name, args.tp),
                *(("--comm-profile", str(_save(profile, tmp))) if name == "auto" else ()),
            )
            for name in names
        }
        config = json.loads((arts["tp1"] / "manifest.json").read_text())["model"]["config"]
        print(
            f"model: {model_dir.name}, {config['num_layers']} layers, hidden "
            f"{config['hidden_size']}, {args.dtype}, tp {args.tp}, {torch.get_num_threads()} "
            f"threads; all-reduce (gloo, this run): "
            + ", ".join(f"{b // 1024} KiB {1e3 * t:.2f} ms" for b, t in profile.points[::2])
            + f"; overlap {profile.overlap:.2f} (share of a collective compute hides)"
        )
        for batch in args.batch:
            measured = {
                n: time_steps(a, batch, args.prompt_len, args.steps) for n, a in arts.items()
            }
            shapes = {
                "prefill": ([args.prompt_len] * batch, 0),
                "decode": ([1] * batch, args.prompt_len),
            }
            for i, (phase, (lens, cached)) in enumerate(shapes.items()):
                preds = {n: predict(arts[n], lens, cached, profile) for n in names if n != "tp1"}
                comm = preds["none"]["comm_ms"]
                base = measured["none"][i]
                print(
                    f"  B={batch:<3} {phase:<7} tp1 {measured['tp1'][i]:8.2f} ms   "
                    f"all-reduce {comm:6.2f} ms/step"
                )
                for n in names[1:]:
                    got, pred = measured[n][i], preds[n]
                    hidden = (base - got) / comm if comm and n != "none" else 0.0
                    print(
                        f"      {n:<10} {pred['variant']:<10} measured {got:8.2f} ms "
                        f"({got / base:4.2f}x none)  predicted {pred['predicted_ms']:8.2f} ms "
                        f"({pred['predicted_ms'] / got:4.2f}x measured)  exposed comm "
                        f"{pred['exposed_comm_ms']:6.2f} ms  hidden {100 * hidden:6.1f}%"
                    )


def _save(profile, tmp: Path) -> Path:
    path = tmp / "comm.json"
    path.write_text(json.dumps(profile.to_dict()))
    return path


if __name__ == "__main__":
    main()
