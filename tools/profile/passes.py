"""`xllm profile passes MODEL|ART`: for each pass in pipeline order, what it did to the graph
(nodes before/after, ops fused, compile time) and what it buys: the decode and prefill step time
with the pipeline cut after that pass, and the time that pass saves per bucket. `--verify` adds
each cut's logits against the unoptimized program's and names the first pass that moves them
beyond the dtype's tolerance (the bisection a drifting artifact needs).

The model is traced once; the passes run one at a time on that program and each cut is written
as an artifact (compiler.compile_cuts) and loaded with runtime.load, so every figure comes from
the runtime's real executor and graph cache. Cuts are timed in interleaved rounds (every cut once
a round), medians of every run with their spread (steps.Timing).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from xllm_compile.errors import ConfigError
from xllm_compile.passes.manager import rel_err
from xllm_compile.progress import progress
from xllm_compile.tools.profile import steps
from xllm_compile.tools.profile.table import Table

PROMPT_LEN = 16  # tokens each sequence holds before the timed decode steps


@dataclasses.dataclass
class Source:
    """The model to recompile and the options of the artifact it came from (if any)."""

    model_dir: Path
    dtype: str = "float32"
    quant: str = "auto"


def resolve_source(path: str | Path, tmp: Path, dtype: str | None) -> Source:
    """MODEL (an HF folder or a .gguf) or ART (an artifact: its manifest's source, recompiled
    with its dtype and --quant).

    Raises:
        ConfigError: the path is none of these, or the artifact's source is gone.
    """
    from xllm_compile.artifact import MANIFEST, read_manifest

    path = Path(path)
    if (path / MANIFEST).is_file():
        m = read_manifest(path)
        src = (m.get("source") or {}).get("path")
        if not src or not Path(src).exists():
            where = f" ({src} no longer exists)" if src else ""
            raise ConfigError(
                f"{path}: the artifact does not say where its model is{where}; give the model "
                "folder or .gguf instead (xllm profile passes MODEL)"
            )
        quant = (m.get("source") or {}).get("quant", "auto")
        return dataclasses.replace(resolve_source(src, tmp, dtype or m["dtype"]), quant=quant)
    if path.suffix == ".gguf" and path.is_file():
        from xllm_compile.gguf import gguf_to_hf_folder

        folder = gguf_to_hf_folder(path, tmp / "hf", show_progress=False, keep_blocks=True)
        return Source(folder, dtype or "float32")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path}: not a model folder (no config.json), a .gguf file or an artifact"
        )
    return Source(path, dtype or "float32")


def _cfg(src: Source, out: Path, batches: list[int], tokens: list[int], max_len: int):
    from xllm_compile.config import CompileConfig

    kv = 1 << max(max_len - 1, 1).bit_length()  # one kv bucket holding every timed step
    buckets = f"decode={','.join(map(str, batches))};prefill=;kv={min(kv, max_len)}"
    return CompileConfig(
        model_path=str(src.model_dir),
        out_dir=str(out),
        dtype=src.dtype,
        max_model_len=max_len,
        max_num_tokens=max([*tokens, max(batches) * PROMPT_LEN, 64]),
        max_num_seqs=max(batches),
        buckets=buckets,
        show_progress=False,
        verify=False,
        quant=src.quant,
    )


def profile_passes(
    model: str | Path,
    batches: list[int] = (1, 8),
    tokens: list[int] = (128,),
    rounds: int = 3,
    decode_steps: int = 8,
    prefill_repeats: int = 2,
    dtype: str | None = None,
    verify: bool = False,
    show_progress: bool = True,
    graph_cache: str | bool = "auto",
) -> dict[str, Any]:
    """Returns {"cuts": [...], "table": Table, "first_drift": name | None, "tolerance": float}.
    Each cut: label, pass, stats (nodes_before/after, matches, replaced), compile_ms, skipped,
    decode {batch: Timing}, prefill {tokens: Timing}, and with `verify` its logits' error."""
    from xllm_compile.compiler import compile_cuts
    from xllm_compile.passes.manager import TOLERANCE
    from xllm_compile.runtime import load

    batches, tokens = sorted(set(batches)), sorted(set(tokens))
    if not batches or min(batches) < 1 or (tokens and min(tokens) < 1):
        raise ConfigError("--batch and --tokens take positive sizes (e.g. --batch 1,8)")
    with tempfile.TemporaryDirectory(prefix="xllm-profile-") as tmp_name:
        tmp = Path(tmp_name)
        src = resolve_source(model, tmp, dtype)
        max_len = max([*tokens, PROMPT_LEN + decode_steps + 1]) + 16
        with progress(total=None, desc="compiling the cuts", unit="", show=show_progress):
            cuts = compile_cuts(_cfg(src, tmp / "cuts", batches, tokens, max_len), tmp / "cuts")
        engines = {}
        for label, path, _ in cuts:
            engines[label] = load(path, max_num_seqs=max(batches), graph_cache=graph_cache)
        records = [_record(label, entry) for label, _, entry in cuts]
        decode = {r["label"]: {b: [] for b in batches} for r in records}
        prefill = {r["label"]: {t: [] for t in tokens} for r in records}
        work = rounds * len(records) * (len(batches) + len(tokens))
        with progress(total=work, desc="timing", unit="run", show=show_progress) as bar:
            for b in batches:  # build each cut's buckets before any timing
                for label in engines:
                    steps.decode_seconds(engines[label], b, 2, PROMPT_LEN)
            for _ in range(rounds):
                for r in records:
                    engine = engines[r["label"]]
                    for b in batches:
                        decode[r["label"]][b] += steps.decode_seconds(
                            engine, b, decode_steps, PROMPT_LEN
                        )
                        bar.update(1)
                    for t in tokens:
                        prefill[r["label"]][t] += steps.prefill_seconds(engine, t, prefill_repeats)
                        bar.update(1)
        for r in records:
            r["decode"] = {b: steps.Timing.of(decode[r["label"]][b]) for b in batches}
            r["prefill"] = {t: steps.Timing.of(prefill[r["label"]][t]) for t in tokens}
        tolerance = TOLERANCE.get(getattr(torch, src.dtype), 1e-4)
        first_drift = None
        if verify:
            _verify(records, engines)
            first_drift = next((r["pass"] for r in records if r["error"] > tolerance), None)
        for engine in engines.values():
            engine.close()
    table = _table(records, batches, tokens, verify, tolerance, first_drift)
    return {"cuts": records, "table": table, "first_drift": first_drift, "tolerance": tolerance}


def _record(label: str, entry: dict | None) -> dict[str, Any]:
    if entry is None:
        return {"label": label, "pass": None, "stats": None, "compile_ms": 0.0, "skipped": None}
    return {
        "label": label,
        "pass": entry["name"],
        "stats": entry["stats"],
        "compile_ms": 1000 * entry["time_s"],
        "skipped": entry["skipped"],
    }


def _verify(records: list[dict], engines: dict) -> None:
    """Each cut's logits (a prefill, then greedy decode steps) against the first cut's."""
    ref = steps.reference_logits(engines[records[0]["label"]])
    for r in records:
        out = steps.reference_logits(engines[r["label"]])
        r["error"] = rel_err(out, ref)


def _fused(stats: dict | None) -> str:
    if not stats or not stats["replaced"]:
        return ""
    return ", ".join(f"{k} {v}" for k, v in stats["replaced"].items())


def _table(records, batches, tokens, verify, tolerance, first_drift) -> Table:
    columns = ["pipeline cut", "nodes", "delta", "matches", "compile ms"]
    for b in batches:
        columns += [f"decode b={b} ms", "±", "saved"]
    for t in tokens:
        columns += [f"prefill {t} ms", "±", "saved"]
    if verify:
        columns.append("logits err")
    columns.append("what")
    table = Table("passes: the pipeline cut after each pass (same inputs, same run)", columns)
    prev = None
    for r in records:
        s = r["stats"]
        if r["skipped"]:
            nodes, delta = None, None
        elif s is None:  # the traced program: the node count the first pass started from
            ran = [x["stats"] for x in records if x["stats"] and not x["skipped"]]
            nodes, delta = (ran[0]["nodes_before"] if ran else None), None
        else:
            nodes, delta = s["nodes_after"], s["nodes_after"] - s["nodes_before"]
        row = [r["label"], nodes, delta, None if s is None else s["matches"], r["compile_ms"]]
        for b in batches:
            t = r["decode"][b]
            saved = None if prev is None else prev["decode"][b].median_ms - t.median_ms
            row += [t.median_ms, t.spread_ms, saved]
        for n in tokens:
            t = r["prefill"][n]
            saved = None if prev is None else prev["prefill"][n].median_ms - t.median_ms
            row += [t.median_ms, t.spread_ms, saved]
        if verify:
            row.append(r["error"])
        row.append(f"skipped: {r['skipped']}" if r["skipped"] else _fused(s))
        table.add(*row)
        prev = r
    if records and records[0]["stats"] is None:
        first, last = records[0], records[-1]
        for b in batches:
            ratio = last["decode"][b].median_ms / first["decode"][b].median_ms
            table.notes.append(f"decode b={b}: all passes {ratio:.2f}x the unoptimized program")
    if verify:
        table.notes.append(
            f"logits err: max|cut - none| / max|none| over a prefill and 3 decode steps; "
            f"tolerance {tolerance:g}. "
            + (f"first pass beyond it: {first_drift}" if first_drift else "no pass beyond it")
        )
    return table
