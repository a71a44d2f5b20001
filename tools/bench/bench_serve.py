"""Load benchmark of `xllm serve` over loopback: throughput, time to first token and inter-token
latency percentiles at fixed concurrency levels and at Poisson arrival rates, and a shared-prefix
workload (one long system prompt before every request) with prefix sharing on and off, in the
same run on the same machine.

    python -m xllm_compile.tools.bench.bench_serve                       # SmolLM2 (bf16)
    python -m xllm_compile.tools.bench.bench_serve --artifact ART --concurrency 1 8 --rates 2

The server runs as its own process (`xllm serve`, so the load generator does not share its
interpreter) on 127.0.0.1 and is stopped after each scenario. Prompts are random token ids with a
realistic length mix (log-normal prompt and output lengths, ShareGPT-like shape, scaled down for
CPUs), sent as streamed completions with ignore_eos, so every request generates exactly its
drawn length. Every scenario is bounded in requests and seconds; a request still open at the
time limit is counted as unfinished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Result:
    """One request's timings (seconds from its start) and tokens."""

    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Workload:
    prompts: list[list[int]]
    outputs: list[int]


def lognormal_lengths(rng: random.Random, n: int, median: int, sigma: float, lo: int, hi: int):
    return [min(hi, max(lo, round(median * math.exp(rng.gauss(0, sigma))))) for _ in range(n)]


def make_workload(n: int, vocab: int, seed: int, prompt_median: int, output_median: int,
                  prefix: list[int] | None = None) -> Workload:  # fmt: skip
    rng = random.Random(seed)
    plen = lognormal_lengths(rng, n, prompt_median, 0.8, 4, 8 * prompt_median)
    olen = lognormal_lengths(rng, n, output_median, 0.6, 4, 4 * output_median)
    prompts = [(prefix or []) + [rng.randrange(3, vocab) for _ in range(p)] for p in plen]
    return Workload(prompts, olen)


class Server:
    """`xllm serve ARTIFACT --port 0` in a child process; its URL from the line it prints."""

    def __init__(self, artifact: Path, *flags: str) -> None:
        cmd = [sys.executable, "-m", "xllm_compile", "serve", str(artifact), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, "--no-access-log", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if " at " not in line:
            self.stop()
            raise SystemExit(f"xllm serve did not start: {line.strip() or 'no output'}")
        self.url = line.split(" at ")[1].split()[0].removesuffix("/v1")

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}  # fmt: skip
    res, start = Result(), time.perf_counter()
    last = start
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                n = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
                if not n:
                    continue
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = now - start
                else:
                    res.itl.extend([(now - last) / n] * n)
                res.tokens += n
                last = now
        res.e2e = time.perf_counter() - start
    except Exception as e:  # a dropped connection counts as an error, the run goes on
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, work: Workload, concurrency: int | None, rate: float | None,
                   max_seconds: float, seed: int) -> tuple[list[Result], float]:  # fmt: skip
    """Send the workload at `concurrency` requests in flight, or as Poisson arrivals at `rate`
    requests/s; returns the results and the wall time."""
    import httpx

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    timeout = httpx.Timeout(max_seconds + 60)
    results: list[Result] = []
    rng = random.Random(seed)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        deadline = start + max_seconds
        pending = list(zip(work.prompts, work.outputs, strict=True))

        async def worker() -> None:
            while pending and time.perf_counter() < deadline:
                prompt, n = pending.pop(0)
                results.append(await one_request(client, url, prompt, n))

        if concurrency is not None:
            tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        else:
            tasks = []
            for prompt, n in pending:
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.ensure_future(one_request(client, url, prompt, n)))
                await asyncio.sleep(rng.expovariate(rate))
        left = max(1.0, deadline - time.perf_counter() + 30)
        done, not_done = await asyncio.wait(tasks, timeout=left)
        for task in not_done:
            task.cancel()
        if concurrency is None:
            results = [t.result() for t in done if not t.cancelled()]
        wall = time.perf_counter() - start
    # requests cut at the time limit count as errors; those never sent are not counted
    results += [Result(error="unfinished at the time limit")] * len(not_done)
    return results, wall


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.e2e is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    tokens = sum(r.tokens for r in ok)
    return {
        "scenario": name,
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "out_tok_per_s": tokens / wall,
        "ttft_ms": [1e3 * pct(ttft, q) for q in (0.5, 0.9, 0.99)],
        "ttft_mean_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan"),
        "itl_ms": [1e3 * pct(itl, q) for q in (0.5, 0.9, 0.99)],
        "e2e_p50_s": pct([r.e2e for r in ok], 0.5),
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'scenario':<28}{'done':>6}{'err':>5}{'req/s':>8}{'tok/s':>8}"
            f"{'TTFT p50/p90/p99 ms':>24}{'ITL p50/p90/p99 ms':>22}{'e2e p50 s':>11}")  # fmt: skip
    print(head)
    for r in rows:
        ttft = "/".join(f"{x:.0f}" for x in r["ttft_ms"])
        itl = "/".join(f"{x:.1f}" for x in r["itl_ms"])
        print(
            f"{r['scenario']:<28}{r['requests']:>6}{r['errors']:>5}{r['req_per_s']:>8.2f}"
            f"{r['out_tok_per_s']:>8.1f}{ttft:>24}{itl:>22}{r['e2e_p50_s']:>11.2f}"
        )


def smollm2_artifact(tmp: Path) -> Path:
    from xllm_compile.pull import pull
    from xllm_compile.tools.bench.bench_decode import compile_for_bench

    gguf = pull("smollm2", quiet=False)
    print(f"compiling {gguf.name} as bfloat16 (--quant none) ...", flush=True)
    return compile_for_bench(gguf, tmp / "smollm2-bf16", "bfloat16", 2048, 64, "--quant", "none")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", help="an artifact (default: SmolLM2-135M compiled as bf16)")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64])
    p.add_argument("--rates", type=float, nargs="*", default=[2.0, 8.0], help="requests/s")
    p.add_argument("--requests", type=int, default=64, help="requests per scenario (at most)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="per scenario")
    p.add_argument("--prompt-median", type=int, default=96)
    p.add_argument("--output-median", type=int, default=48)
    p.add_argument("--prefix-tokens", type=int, default=512, help="shared system prompt length")
    p.add_argument("--prefix-concurrency", type=int, default=8)
    p.add_argument("--no-shared-prefix", action="store_true", help="skip that workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        art = Path(args.artifact) if args.artifact else smollm2_artifact(Path(tmp))
        manifest = json.loads((art / "manifest.json").read_text())
        vocab = manifest["model"]["config"]["vocab_size"]
        rows = []
        print(f"artifact {art} ({manifest['dtype']}), {args.requests} requests a scenario")
        server = Server(art)
        try:
            for c in args.concurrency:
                work = make_workload(args.requests, vocab, args.seed, args.prompt_median,
                                     args.output_median)  # fmt: skip
                res, wall = asyncio.run(run_load(server.url, work, c, None, args.max_seconds, 0))
                rows.append(summary(f"concurrency {c}", res, wall))
                print_table(rows[-1:])
            for rate in args.rates:
                work = make_workload(args.requests, vocab, args.seed + 1, args.prompt_median,
                                     args.output_median)  # fmt: skip
                res, wall = asyncio.run(
                    run_load(server.url, work, None, rate, args.max_seconds, args.seed)
                )
                rows.append(summary(f"poisson {rate:g} req/s", res, wall))
                print_table(rows[-1:])
        finally:
            server.stop()
        if not args.no_shared_prefix:
            rng = random.Random(args.seed + 2)
            prefix = [rng.randrange(3, vocab) for _ in range(args.prefix_tokens)]
            for on in (True, False):
                server = Server(art, "--prefix-caching" if on else "--no-prefix-caching")
                try:
                    work = make_workload(args.requests, vocab, args.seed + 3, 24, 16, prefix)
                    res, wall = asyncio.run(
                        run_load(
                            server.url, work, args.prefix_concurrency, None, args.max_seconds, 0
                        )  # fmt: skip
                    )
                    row = summary(f"shared prefix, sharing {'on' if on else 'off'}", res, wall)
                    m = server.metrics()
                    label = '{model_name="' + art.name + '"}'
                    queries = m.get(f"vllm:prefix_cache_queries_total{label}", 0)
                    hits = m.get(f"vllm:prefix_cache_hits_total{label}", 0)
                    row["prefix_hit_rate"] = hits / queries if queries else 0.0
                    rows.append(row)
                    print_table(rows[-1:])
                finally:
                    server.stop()
            on, off = rows[-2], rows[-1]
            t_on, t_off = on["ttft_ms"][0], off["ttft_ms"][0]
            print(
                f"shared prefix of {args.prefix_tokens} tokens at concurrency "
                f"{args.prefix_concurrency}: TTFT p50 {t_on:.0f} ms with sharing vs "
                f"{t_off:.0f} ms without ({t_on / t_off:.2f}x); "
                f"throughput {on['out_tok_per_s'] / off['out_tok_per_s']:.2f}x; hit rate "
                f"{on['prefix_hit_rate']:.1%}"
            )
        print()
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
