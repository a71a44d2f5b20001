"""Decode ms/step and prefill tokens/s of a compiled artifact against transformers eager on the
same weights, same machine, same run; printed with ratios (xllm / HF: below 1 is faster for ms).

    python -m xllm_compile.tools.bench.bench_decode --model examples/tiny-llama
    python -m xllm_compile.tools.bench.bench_decode --preset qwen2.5-0.5b --batch 1 8

`--preset qwen2.5-0.5b` builds a random-weight model with Qwen2.5-0.5B's real shape.
`--hf-static` adds transformers' compiled static-cache path (cache_implementation="static",
forward under torch.compile; mode "reduce-overhead", i.e. CUDA graphs, on GPU) as a second peer.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from xllm_compile.cli import compile_main
from xllm_compile.runtime import load
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence

PRESETS = {
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
}


def make_preset(name: str, out: Path) -> Path:
    import transformers

    cfg = dict(PRESETS[name])
    cfg.pop("architectures")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    model.save_pretrained(out)
    return out


def compile_for_bench(
    model_dir: Path, out: Path, dtype: str, max_len: int, max_seqs: int, *extra: str
) -> Path:
    """Compile `model_dir` quietly into `out` for a benchmark (shared by this folder's scripts)."""
    args = [str(model_dir), "--out", str(out), "--dtype", dtype, "--quiet"]
    args += ["--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs), *extra]
    if compile_main(args) != 0:
        raise SystemExit(f"compiling {model_dir} failed (see above)")
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


@torch.inference_mode()
def bench_hf(model_dir: Path, dtype, batch, prompt_len, steps, device) -> tuple[float, float]:
    """(prefill tokens/s, decode ms/step) of transformers eager with its dynamic KV cache."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    model(ids[:, :8])  # warm-up
    out = None

    def prefill():
        nonlocal out
        out = model(ids, use_cache=True)

    t_prefill = _timed(prefill)
    past, token, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        step = model(token, past_key_values=past, use_cache=True)
        past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        _sync()
        times.append(time.perf_counter() - start)
    return batch * prompt_len / t_prefill, 1000 * statistics.median(times)


@torch.inference_mode()
def bench_hf_static(model_dir: Path, dtype, batch, prompt_len, steps, device) -> tuple:
    """(prefill tokens/s, decode ms/step) of transformers' compiled static-cache generation, the
    way its docs benchmark it: generate() with a StaticCache and a compiled forward; decode
    ms/step from two timed generations of 1 and steps + 1 new tokens (after two warm-ups that
    compile), prefill from the 1-token one."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.cache_implementation = "static"
    mode = "reduce-overhead" if device == "cuda" else None
    model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def run(new_tokens: int) -> float:
        return _timed(
            lambda: model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        )

    for _ in range(2):  # compile prefill and decode shapes
        run(steps + 1)
    t_one = min(run(1) for _ in range(2))
    t_all = min(run(steps + 1) for _ in range(2))
    return batch * prompt_len / t_one, 1000 * (t_all - t_one) / steps


def time_decode(engine, seqs: list[Sequence], logits: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of `steps` greedy decode steps of `seqs`, after the step that gave
    `logits` (shared by the benchmarks in this folder)."""
    times = []
    for _ in range(steps):
        for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.output_ids.append(token)
        _sync()
        start = time.perf_counter()
        logits = engine.run_step(seqs)
        _sync()
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def bench_xllm(
    art: Path, batch, prompt_len, steps, graphs: bool, prefill_reps: int = 1
) -> tuple[float, float]:
    """(prefill tokens/s, decode ms/step) of the artifact: ragged prefills, then decode steps
    (through the graph cache when `graphs`: CUDA graphs on GPU). As llama-bench does, a first
    prefill of the same size warms up (per-thread buffers, GEMM primitives) untimed; the tokens/s
    is the mean of `prefill_reps` timed ones, each on fresh sequences."""
    engine = load(art, max_num_seqs=batch, graph_cache=graphs, warmup=graphs)  # True: cpu_graph
    cache = engine.runner
    vocab = engine.manifest["model"]["config"]["vocab_size"]

    logits, seqs, t_prefill = None, [], []

    def prefill() -> None:
        nonlocal logits
        logits = engine.run_step(seqs)

    for rep in range(1 + prefill_reps):  # rep 0: the warm-up
        for seq in seqs:
            engine.kv_cache.free(seq.slot)
        seqs = [
            Sequence(torch.randint(3, vocab, (prompt_len,)).tolist(), SamplingParams())
            for _ in range(batch)
        ]
        for seq in seqs:
            seq.slot = engine.kv_cache.allocate(prompt_len + steps + 1)
        t = _timed(prefill)
        if rep:
            t_prefill.append(t)
        else:  # and decode steps, untimed, as llama-bench's warm-up run: the first steps of a
            # process ran ~15% slower over a whole 32-step window (measured on a Zen 3)
            time_decode(engine, seqs, logits, min(steps, 8))
    times = time_decode(engine, seqs, logits, steps)
    if cache.bucketed:
        st = cache.stats
        print(
            f"      graph cache: {st.builds} builds in {st.build_time_s:.1f} s, {st.hits} hits, "
            f"{st.misses} misses, backend {cache.backend}"
        )
    return batch * prompt_len / statistics.mean(t_prefill), 1000 * statistics.median(times)


def _model_dir(args, tmp: Path) -> Path:
    if args.gguf:
        from xllm_compile.gguf import gguf_to_hf_folder

        return gguf_to_hf_folder(Path(args.gguf), tmp / "hf", show_progress=False)
    return Path(args.model) if args.model else make_preset(args.preset, tmp / "m")


def bench_llama_cpp(gguf: str, batch: int, prompt_len: int, steps: int) -> list:
    """llama.cpp on the same GGUF at batch 1: tools/bench/llama_cpp.py's llama-bench (built from
    the llama-cpp-python sdist on first use; pip's own wheel crashes on some VMs), in a child
    process, so a crash of the native code cannot end the benchmark."""
    from xllm_compile.tools.bench import llama_cpp

    if batch != 1:
        return []
    threads = torch.get_num_threads()
    try:
        prefill = llama_cpp.bench(gguf, threads, prompt=prompt_len)
        decode = llama_cpp.bench(gguf, threads, gen=steps)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"      (llama.cpp did not run: {e}; no llama.cpp row)")
        return []
    return [("llama.cpp", (prefill["tok_s"], decode["ms"]))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF model folder")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument(
        "--gguf",
        help="a GGUF file (dequantized for us and for HF; llama.cpp's llama-bench runs it as "
        "is; tools/bench/bench_quant.py compares our --quant keep artifact)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--hf-static",
        action="store_true",
        help="also time transformers' compiled static-cache path (slow to compile)",
    )
    p.add_argument(
        "--graphs",
        action="store_true",
        help="also decode through the graph cache (CUDA graphs on GPU)",
    )
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model_dir(args, Path(tmp))
        art = Path(tmp) / "art"
        max_len = str(args.prompt_len + args.steps + 16)
        compile_for_bench(
            model_dir, art, args.dtype, int(max_len), max(args.batch), "--device", args.device
        )
        print(
            f"model {args.gguf or args.model or args.preset}  dtype {args.dtype}"
            f"  prompt {args.prompt_len}"
            f"  threads {torch.get_num_threads()}  device {args.device}"
        )
        print(f"{'batch':>5} {'engine':>12} {'prefill tok/s':>14} {'decode ms/step':>15}")
        for batch in args.batch:
            hf = bench_hf(model_dir, dtype, batch, args.prompt_len, args.steps, args.device)
            rows, static = [("HF eager", hf)], None
            if args.hf_static:
                static = bench_hf_static(
                    model_dir, dtype, batch, args.prompt_len, args.steps, args.device
                )
                rows.append(("HF static", static))
            rows.append(("xllm", bench_xllm(art, batch, args.prompt_len, args.steps, False)))
            if args.graphs:
                rows.append(
                    ("xllm+graphs", bench_xllm(art, batch, args.prompt_len, args.steps, True))
                )
            if args.gguf and args.device == "cpu":
                rows += bench_llama_cpp(args.gguf, batch, args.prompt_len, args.steps)
            for name, (tok_s, ms) in rows:
                ratio = (
                    ""
                    if name == "HF eager"
                    else (f"   prefill {tok_s / hf[0]:.2f}x HF, decode {ms / hf[1]:.2f}x HF's time")
                )
                if static and name.startswith("xllm"):
                    ratio += f", {ms / static[1]:.2f}x HF static's"
                print(f"{batch:>5} {name:>12} {tok_s:>14.0f} {ms:>15.2f}{ratio}")


if __name__ == "__main__":
    main()
