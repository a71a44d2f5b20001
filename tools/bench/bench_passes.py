"""Decode ms/step of one model compiled with every pass vs `--passes none`, and each pass's
contribution (the pipeline cut after each pass), on the same inputs in the same run.

    python -m xllm_compile.tools.bench.bench_passes --preset qwen2.5-0.5b --batch 1
    python -m xllm_compile.tools.bench.bench_passes --model examples/tiny-llama --batch 1 8

Each cut is compiled once (no --verify: that is a compile-time cost), then all cuts are timed
in rounds, loaded one at a time; a cut's figure is its best median over the rounds, which keeps
a noisy shared machine from favouring whichever cut ran during a quiet moment.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch

from xllm_compile.compiler import compile_model
from xllm_compile.config import CompileConfig
from xllm_compile.passes import pass_names
from xllm_compile.tools.bench.bench_decode import PRESETS, bench_xllm, make_preset


def cuts() -> list[tuple[str, tuple[str, ...]]]:
    """("none", ()), then ("+cleanup", ("cleanup",)), ... up to the whole pipeline."""
    names = pass_names()
    return [("none", ())] + [(f"+{n}", tuple(names[: i + 1])) for i, n in enumerate(names)]


def compile_cuts(model_dir: Path, out_root: Path, dtype: str, max_len: int, batch: int):
    arts = {}
    for label, passes in cuts():
        cfg = CompileConfig(
            model_path=str(model_dir),
            out_dir=str(out_root / label.lstrip("+")),
            dtype=dtype,
            max_model_len=max_len,
            max_num_seqs=max(batch, 2),
            show_progress=False,
            passes=passes,
            verify=False,
        )
        arts[label] = compile_model(cfg)
    return arts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_preset(args.preset, Path(tmp) / "m")
        max_len = args.prompt_len + args.steps + 16
        arts = compile_cuts(model_dir, Path(tmp), args.dtype, max_len, max(args.batch))
        print(
            f"model {args.model or args.preset}  dtype {args.dtype}  prompt {args.prompt_len}"
            f"  steps {args.steps}  rounds {args.rounds}  threads {torch.get_num_threads()}"
        )
        for batch in args.batch:
            best = {label: float("inf") for label in arts}
            for _ in range(args.rounds):
                for label, art in arts.items():
                    torch.manual_seed(0)  # same prompts for every cut
                    ms = bench_xllm(art, batch, args.prompt_len, args.steps, graphs=False)[1]
                    best[label] = min(best[label], ms)
                    gc.collect()
            _report(batch, best)


def _report(batch: int, best: dict[str, float]) -> None:
    base, labels = best["none"], list(best)
    print(f"\nbatch {batch}: decode ms/step (best of rounds)")
    print(f"  {'pipeline cut':<18} {'ms/step':>8} {'vs none':>8} {'this pass':>10}")
    for i, label in enumerate(labels):
        delta = "" if i == 0 else f"{best[label] - best[labels[i - 1]]:+.2f}"
        print(f"  {label:<18} {best[label]:>8.2f} {best[label] / base:>7.2f}x {delta:>10}")
    print(f"  all passes / none: {best[labels[-1]] / base:.3f}x (below 1 is faster)")


if __name__ == "__main__":
    main()
