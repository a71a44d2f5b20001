"""The page pool and the page-mapped KV cache: map latency per page, KV bytes mapped against a
contiguous max-length preallocation for a realistic mix of lengths (both layouts), and decode
ms/step through the paged cache against a plain tensor on the same artifact.

    python -m xllm_compile.tools.bench.bench_page_pool                # all three, CPU
    python -m xllm_compile.tools.bench.bench_page_pool --device cuda  # latency + decode on GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xllm_compile.runtime import load
from xllm_compile.runtime.page_pool import PagePool, VirtualRange, make_page_pool, round_up
from xllm_compile.runtime.paged_kv_cache import (
    CUDA_GRANULARITY,
    LAYOUTS,
    KVGeometry,
    PagedKVCache,
    _plan,
    build_paged_kv_cache,
)
from xllm_compile.runtime.sampler import SamplingParams
from xllm_compile.runtime.sequence import Sequence

# (layers, KV heads, head dim) of real models, for the waste table
MODELS = {"SmolLM2-135M": (30, 3, 64), "Qwen2.5-0.5B": (24, 2, 64), "Llama-3-8B": (32, 8, 128)}
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def map_latency(device: str, page_size: int, n: int) -> dict:
    """Median µs to map a page the first time (the OS/driver creates it), to unmap it, and to map
    it again from the pool's free list."""
    pool = make_page_pool(device, page_size, n)
    r = pool.reserve(n * page_size)
    first = [_time(lambda i=i: pool.map(r, i)) for i in range(n)]
    if device == "cpu":  # touch every page once so "reuse" maps memory that exists
        pool.tensor(r, torch.uint8)[::4096] = 1
    unmap = [_time(lambda i=i: pool.unmap(r, i)) for i in range(n)]
    again = [_time(lambda i=i: pool.map(r, i)) for i in range(n)]
    pool.close()
    return {
        k: 1e6 * statistics.median(v)
        for k, v in (("first", first), ("unmap", unmap), ("reuse", again))
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CountingPagePool(PagePool):
    """The pool's bookkeeping without the OS: counts what a real pool would map, so the waste of a
    32 GiB layout can be measured on any machine (the tensor is on the meta device)."""

    def reserve(self, nbytes: int) -> VirtualRange:
        vrange = VirtualRange(0, round_up(nbytes, self.page_size))
        self._ranges.append(vrange)
        return vrange

    def map(self, vrange: VirtualRange, index: int, page: int | None = None) -> int:
        page = self._take_page(vrange, index, page)
        self._page_mapped(vrange, index, page)
        return page

    def unmap(self, vrange: VirtualRange, index: int) -> None:
        self._page_unmapped(vrange, index)

    def release(self, vrange: VirtualRange) -> None:
        for index in list(vrange.pages):
            self._page_unmapped(vrange, index)
        self._ranges.remove(vrange)

    def tensor(self, vrange: VirtualRange, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(vrange.nbytes // dtype.itemsize, dtype=dtype, device="meta")


def length_mix(n: int, max_len: int, seed: int = 0) -> list[int]:
    """Prompt + output lengths of chat traffic: log-normal around 512 tokens, capped at max_len."""
    rng = random.Random(seed)
    return [min(max_len, max(16, int(rng.lognormvariate(6.24, 1.0)))) for _ in range(n)]


def waste(geometry: KVGeometry, layout: str, page_size: int, lengths: list[int]) -> dict:
    plan = _plan(geometry, layout, page_size)
    pages = geometry.num_slots * plan.regions * plan.region_bytes // page_size
    cache = PagedKVCache(CountingPagePool(page_size, pages), geometry, layout)
    for n in lengths:
        cache.allocate(n)
    s = cache.pool.stats()
    contiguous = geometry.num_slots * geometry.max_len * geometry.token_bytes
    return dict(
        mapped=s.bytes_mapped,
        used=s.bytes_used,
        waste=s.bytes_wasted / s.bytes_mapped,
        maps=s.map_calls,
        contiguous=contiguous,
    )


def print_waste(num_seqs: int, max_len: int) -> None:
    lengths = length_mix(num_seqs, max_len)
    print(
        f"\nKV bytes for {num_seqs} sequences (median {statistics.median(lengths):.0f}, "
        f"mean {statistics.mean(lengths):.0f} tokens, max {max_len}), bf16"
    )
    print(
        f"{'model':>13} {'page':>9} {'layout':>12} {'mapped MiB':>11} {'wasted':>7} "
        f"{'maps':>7} {'vs contiguous':>14}"
    )
    for name, (layers, heads, dim) in MODELS.items():
        g = KVGeometry(layers, num_seqs, max_len, heads, dim, torch.bfloat16)
        for granularity in (4096, CUDA_GRANULARITY):
            for layout in LAYOUTS:
                row = _plan(g, layout, 1).row_bytes
                page = round_up(16 * row, granularity)
                w = waste(g, layout, page, lengths)
                print(
                    f"{name:>13} {page // 1024:>6}KiB {layout:>12} {w['mapped'] / 2**20:>11.0f} "
                    f"{w['waste']:>7.1%} {w['maps']:>7} {w['mapped'] / w['contiguous']:>13.1%}"
                )


@torch.inference_mode()
def decode_ms(engine, batch: int, context: int, steps: int) -> float:
    """Median ms of one decode step of `batch` sequences that each hold `context` tokens."""
    vocab = engine.manifest["model"]["config"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    seqs = [
        Sequence(torch.randint(3, vocab, (context,), generator=gen).tolist(), SamplingParams())
        for _ in range(batch)
    ]
    for seq in seqs:
        seq.slot = engine.kv_cache.allocate(context)
    logits = engine.run_step(seqs)
    times = []
    for _ in range(steps):
        for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.output_ids.append(token)
            assert engine.kv_cache.grow(seq.slot, seq.num_tokens)
        _sync(engine.runner.device.type)
        start = time.perf_counter()
        logits = engine.run_step(seqs)
        _sync(engine.runner.device.type)
        times.append(time.perf_counter() - start)
    for seq in seqs:
        engine.kv_cache.free(seq.slot)
    return 1000 * statistics.median(times)


def make_artifact(root: Path, device: str, max_len: int, batch: int) -> Path:
    import transformers

    from xllm_compile.cli import compile_main

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2))
    model.save_pretrained(root / "hf")
    args = [str(root / "hf"), "--out", str(root / "art"), "--quiet", "--device", device]
    args += ["--max-model-len", str(max_len), "--max-num-seqs", str(batch)]
    assert compile_main(args) == 0
    return root / "art"


def print_decode(device: str, batch: int, context: int, steps: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        art = make_artifact(Path(tmp), device, context + steps + 16, batch)
        engines = {"plain tensor": load(art, device=device, kv_cache="contiguous")}
        for layout in LAYOUTS:
            engine = load(art, device=device, kv_cache="paged", kv_memory=1.0)
            if engine.kv_cache.layout != layout:
                geometry = engine.kv_cache.geometry
                engine.kv_cache.close()
                cache = build_paged_kv_cache(geometry, device, 1.0, layout=layout)
                engine.kv_cache = engine.scheduler.kv_cache = cache
            engines[f"paged {layout}"] = engine
        paged = engines["paged token_major"].kv_cache
        print(
            f"\ndecode, SmolLM2-135M shape fp32 on {device}, batch {batch}, context {context}, "
            f"page {paged.pool.page_size // 1024} KiB, threads {torch.get_num_threads()}"
        )
        results = {name: [] for name in engines}
        for _ in range(rounds):  # interleaved, so drift in a shared machine hits both
            for name, engine in engines.items():
                results[name].append(decode_ms(engine, batch, context, steps))
        for name, ms in results.items():
            print(
                f"{name:>18}: {statistics.median(ms):7.2f} ms/step  (rounds: "
                + ", ".join(f"{m:.2f}" for m in ms)
                + ")"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--pages", type=int, default=256, help="pages mapped per latency run")
    p.add_argument("--seqs", type=int, default=300, help="sequences in the waste mix")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args(argv)
    sizes = [4096, 64 << 10, 2 << 20] if args.device == "cpu" else [2 << 20, 8 << 20]
    print(f"map latency on {args.device}, {args.pages} pages, median µs per page")
    for size in sizes:
        lat = map_latency(args.device, size, args.pages)
        print(
            f"  page {size // 1024:>5} KiB: first map {lat['first']:7.1f}  unmap "
            f"{lat['unmap']:7.1f}  map from pool {lat['reuse']:7.1f}"
        )
    print_waste(args.seqs, 4096)
    if not args.skip_decode:
        print_decode(args.device, args.batch, args.context, args.steps, args.rounds)


if __name__ == "__main__":
    main()
