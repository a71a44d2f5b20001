"""`xllm profile cache ART`: the graph cache as the runtime builds it — which buckets exist, the
build time and memory of each (its static buffers and captured graph, plus its planned share of
the activation arena) — and, given a histogram of observed step sizes, the padding each step pays
and a bucket set chosen for that traffic under a budget.

The histogram file holds one observed step a line: `decode B` (a decode step of B sequences),
`prefill T` (a prefill of T tokens) or a bare `B` (decode); `SIZE COUNT` pairs (`decode 3 120`)
weigh a line. Blank lines and `#` comments are skipped.

The suggestion minimizes the padded work (sum over steps of bucket - size, weighted by count)
with at most `--max-buckets` sizes, or as many as `--budget BYTES` of bucket memory allows
(memory per decode bucket estimated from the built ones: a least-squares line in the batch size);
every observed size gets a bucket. It prints as the `--buckets` value xllm-compile takes.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from xllm_compile.errors import ConfigError
from xllm_compile.progress import progress
from xllm_compile.tools.profile.table import Table


def read_histogram(path: str | Path) -> dict[str, Counter]:
    """{"decode": Counter(size -> steps), "prefill": Counter(tokens -> steps)}."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--histogram {path}: cannot read it ({e})") from None
    out = {"decode": Counter(), "prefill": Counter()}
    for i, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        phase = "decode"
        if parts[0] in out:
            phase, parts = parts[0], parts[1:]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or min(values) < 1:
            raise ConfigError(
                f"--histogram {path}:{i}: {raw.strip()!r}; expected 'decode B', 'prefill T' "
                "or 'B', optionally followed by a count"
            )
        out[phase][values[0]] += values[1] if len(values) == 2 else 1
    if not any(out.values()):
        raise ConfigError(f"--histogram {path}: no step sizes in it")
    return out


def padding(hist: Counter, buckets: list[int]) -> dict[str, float]:
    """Padded work of `hist` under `buckets`: real and padded sizes summed, the waste fraction,
    and the steps no bucket holds (they run unbucketed)."""
    real = padded = uncovered = 0
    ordered = sorted(buckets)
    for size, count in hist.items():
        b = next((x for x in ordered if x >= size), None)
        if b is None:
            uncovered += count
            continue
        real += size * count
        padded += b * count
    return {
        "real": real,
        "padded": padded,
        "waste": (padded - real) / padded if padded else 0.0,
        "uncovered_steps": uncovered,
    }


def suggest(hist: Counter, max_buckets: int) -> list[int]:
    """At most `max_buckets` sizes minimizing the padded work of `hist`, the largest observed
    size among them (so every observed size is covered): dynamic programming over the sorted
    distinct sizes, each group padded to its largest member."""
    sizes = sorted(hist)
    if not sizes:
        return []
    k = max(1, min(max_buckets, len(sizes)))
    n = len(sizes)
    inf = float("inf")

    def cost(i: int, j: int) -> float:  # sizes[i..j] padded to sizes[j]
        return sum((sizes[j] - sizes[m]) * hist[sizes[m]] for m in range(i, j + 1))

    # best[g][j]: the least cost of covering sizes[0..j] with g buckets, the last at sizes[j]
    best = [[inf] * n for _ in range(k + 1)]
    back = [[-1] * n for _ in range(k + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for g in range(2, k + 1):
        for j in range(n):
            for i in range(j):
                c = best[g - 1][i] + cost(i + 1, j)
                if c < best[g][j]:
                    best[g][j], back[g][j] = c, i
    g = min(range(1, k + 1), key=lambda x: (best[x][n - 1], x))
    chosen, j = [], n - 1
    while j >= 0 and g >= 1:
        chosen.append(sizes[j])
        j, g = back[g][j], g - 1
    return sorted(chosen)


def _fit_memory(points: list[tuple[int, int]]):
    """bytes(b) = a + c * b by least squares over (batch, bytes) points."""
    if not points:
        return lambda b: 0.0
    if len(points) == 1:
        return lambda b, p=points[0]: p[1] * b / max(p[0], 1)
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points) or 1.0
    c = sum((p[0] - mx) * (p[1] - my) for p in points) / var
    a = my - c * mx
    return lambda b: max(0.0, a + c * b)


def profile_cache(
    artifact: str | Path,
    histogram: str | Path | None = None,
    max_buckets: int | None = None,
    budget_bytes: int | None = None,
    show_progress: bool = True,
    graph_cache: str = "auto",
) -> dict[str, Any]:
    from xllm_compile.arena_plans import find_plan
    from xllm_compile.runtime import load

    engine = load(artifact, graph_cache=graph_cache)
    runner = engine.runner
    if not runner.bucketed:
        raise ConfigError(
            f"{artifact}: this artifact runs without a graph cache here (a --tp or non-CPU "
            "artifact); load it where one applies"
        )
    import torch

    from xllm_compile import buckets as B

    kv = engine.kv_cache.tensor
    rows = []
    keys = runner.keys()
    with progress(
        total=len(keys), desc="building buckets", unit="bucket", show=show_progress
    ) as bar:
        for key in keys:
            start = time.perf_counter()
            entry = runner._entry(key, kv)
            build_s = time.perf_counter() - start
            sizes = B.key_sizes(key)
            metas = [torch.empty(n, dtype=torch.int64, device="meta") for n in sizes]
            plan = find_plan(runner.plans, [*runner.params, *metas, kv[:, :, :, : key[-1]]])
            rows.append(
                {
                    "bucket": key,
                    "phase": key[0],
                    "batch": key[1] if key[0] == "decode" else key[2],
                    "tokens": key[1],
                    "kv_len": key[-1],
                    "build_s": build_s,
                    "entry_bytes": entry.nbytes,
                    "arena_bytes": plan.arena_bytes if plan is not None else None,
                    "backend": runner.backend,
                }
            )
            bar.update(1)
    manifest_buckets = engine.manifest.get("buckets") or {}
    decode_buckets = sorted(set(runner.batch_buckets))
    prefill_buckets = sorted(set(runner.prefill_buckets))
    result: dict[str, Any] = {
        "artifact": str(artifact),
        "backend": runner.backend,
        "buckets": rows,
        "manifest_buckets": manifest_buckets,
        "arena_bytes": runner.arena_bytes,
    }
    t = Table(
        f"graph cache: {len(rows)} buckets ({runner.backend})",
        ["phase", "batch", "tokens", "kv len", "build ms", "entry bytes", "arena plan bytes"],
    )
    for r in rows:
        t.add(r["phase"], r["batch"], r["tokens"], r["kv_len"], 1000 * r["build_s"],
              r["entry_bytes"], r["arena_bytes"])  # fmt: skip
    t.notes.append(
        f"arena (shared by every bucket: one runs at a time): {runner.arena_bytes} bytes mapped; "
        f"total build {sum(r['build_s'] for r in rows):.2f} s"
    )
    tables = [t]
    if histogram is not None:
        hist = read_histogram(histogram)
        result["histogram"] = {k: dict(v) for k, v in hist.items()}
        per_bucket = _decode_memory(rows)
        limit = engine.scheduler.max_num_seqs
        sug_table = Table(
            "padding under the artifact's buckets and a suggested set for this traffic",
            ["phase", "buckets", "steps", "real", "padded", "waste", "uncovered steps"],
        )
        suggestion = {}
        for phase, have in (("decode", decode_buckets), ("prefill", prefill_buckets)):
            h = hist[phase]
            if not h:
                continue
            now = padding(h, have)
            sug_table.add(phase, ",".join(map(str, have)) or "(none)", sum(h.values()), *_row(now))
            k = max_buckets or len(h)
            chosen = suggest(h, k)
            if phase == "decode" and budget_bytes is not None:
                while len(chosen) > 1 and sum(per_bucket(b) for b in chosen) > budget_bytes:
                    k = len(chosen) - 1
                    chosen = suggest(h, k)
            new = padding(h, chosen)
            suggestion[phase] = chosen
            sug_table.add(
                f"{phase} suggested", ",".join(map(str, chosen)), sum(h.values()), *_row(new)
            )
        spec = ";".join(f"{p}={','.join(map(str, v))}" for p, v in suggestion.items())
        result["suggestion"] = suggestion
        result["buckets_arg"] = spec
        sug_table.notes.append(f'xllm-compile ... --buckets "{spec}"')
        if "decode" in suggestion and max(suggestion["decode"]) < limit:
            sug_table.notes.append(
                f"(xllm-compile adds decode={limit}, the artifact's --max-num-seqs, so every "
                "batch keeps a bucket)"
            )
        if budget_bytes is not None:
            est = sum(per_bucket(b) for b in suggestion.get("decode", []))
            sug_table.notes.append(
                f"decode bucket memory of the suggestion (estimated): {est:.0f} of "
                f"{budget_bytes} bytes budget"
            )
        tables.append(sug_table)
    engine.close()
    result["tables"] = tables
    return result


def _row(p: dict) -> list:
    return [p["real"], p["padded"], p["waste"], p["uncovered_steps"]]


def _decode_memory(rows: list[dict]):
    points: dict[int, int] = {}
    for r in rows:
        if r["phase"] == "decode":
            total = r["entry_bytes"] + (r["arena_bytes"] or 0)
            points[r["batch"]] = max(points.get(r["batch"], 0), total)
    return _fit_memory(sorted(points.items()))
