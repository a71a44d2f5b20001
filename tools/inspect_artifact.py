"""`xllm inspect ARTIFACT`: the manifest as a readable table (or JSON)."""

from __future__ import annotations

import json

from xllm_compile.artifact import read_manifest
from xllm_compile.signing import signer


def _table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def inspect_artifact(path: str, as_json: bool = False) -> str:
    from pathlib import Path

    m = read_manifest(Path(path))
    if as_json:
        return json.dumps(m, indent=2)
    c = m["model"]["config"]
    model_rows = [
        ("family", f"{m['model']['family']} ({m['model']['architecture']})"),
        ("parameters", f"{m['model'].get('num_parameters', 0):,}"),
        ("layers", str(c["num_layers"])),
        ("hidden / intermediate", f"{c['hidden_size']} / {c['intermediate_size']}"),
        (
            "heads / kv heads / head dim",
            f"{c['num_heads']} / {c['num_kv_heads']} / {c['head_dim']}",
        ),
        ("vocab", str(c["vocab_size"])),
        ("rope", f"{c['rope']['rope_type']} theta={c['rope']['theta']:g}"),
        ("tied embeddings", str(c["tie_word_embeddings"])),
        ("dtype / device", f"{m['dtype']} / {m['device']}"),
    ]
    model_rows += [(k, str(v)) for k, v in m["limits"].items()]
    for name, sizes in (m.get("buckets") or {}).items():
        model_rows.append((f"buckets {name}", ",".join(map(str, sizes))))
    model_rows.append(("tokenizer", "yes" if m.get("tokenizer") else "no"))
    tp_info = m.get("tp") or {"size": 1}
    model_rows.append(("tensor parallel", f"{tp_info['size']} rank(s)"))
    for rank, entry in enumerate(tp_info.get("ranks", [])):
        model_rows.append((f"rank {rank}", f"{entry['program']} + {entry['weights']}"))
    if tp_info.get("local"):
        local = tp_info["local"]
        model_rows.append(
            (
                "per rank: heads / kv heads / intermediate",
                f"{local['num_heads']} / {local['num_kv_heads']} / {local['intermediate_size']}",
            )
        )
    model_rows += [(k, v) for k, v in m["versions"].items()]
    model_rows += [("format", str(m["format_version"])), ("created", m.get("created", "?"))]
    signed_by = signer(Path(path))  # claimed, not verified: `--trust` verifies
    model_rows.append(("signed by", signed_by or "not signed"))
    files = [
        (name, f"{_human_bytes(f['bytes']):>10}  sha256 {f['sha256'][:16]}…")
        for name, f in m["files"].items()
    ]
    parts = [_table(model_rows, f"artifact {path}"), _table(files, "files")]
    if m.get("passes"):
        parts.append(_pass_table(m["passes"]))
    if m.get("overlap"):
        parts.append(_overlap_table(m["overlap"]))
    if m.get("memory_plan"):
        table = _memory_plan_table(m["memory_plan"])
        if m.get("arena_plans"):
            n = m["arena_plans"]["plans"]
            table += f"\n  bucket plans: {n} in {m['arena_plans']['file']} (graph cache arena)"
        parts.append(table)
    return "\n\n".join(parts)


def _pass_table(passes: list[dict]) -> str:
    """One row per pass: nodes before -> after, matches, time, and what it replaced (or why it
    was skipped)."""
    header = ("pass", "ver", "nodes", "matches", "ms", "what")
    rows = []
    for p in passes:
        s = p.get("stats", {})
        what = p["skipped"] and f"skipped: {p['skipped']}"
        what = what or ", ".join(f"{k} {v}" for k, v in s.get("replaced", {}).items()) or "-"
        nodes = (
            "-" if p.get("skipped") else f"{s.get('nodes_before', 0)} -> {s.get('nodes_after', 0)}"
        )
        ms = f"{1000 * p.get('time_s', 0):.1f}"
        rows.append(
            (p["name"], str(p.get("version", "")), nodes, str(s.get("matches", 0)), ms, what)
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["passes", "------"]
    for r in [header, *rows]:
        cells = [
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(r[:-1], widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells) + "  " + r[-1])
    return "\n".join(lines)


def _overlap_table(o: dict) -> str:
    """--overlap auto: the program each step size runs, and the cost model's predictions."""
    rows, low = [], 1
    for bound, variant in o["select"]:
        span = f"{low}+ tokens" if bound is None else f"{low}-{bound} tokens"
        rows.append((span, variant))
        low = (bound or 0) + 1
    if o.get("reason"):
        rows.append(("why", o["reason"]))
    for variant, entry in (o.get("variants") or {}).items():
        rows.append((f"{variant} programs", ", ".join(entry["ranks"])))
        done = [p for p in entry.get("passes", []) if not p.get("skipped")]
        what = [
            f"{p['name']}: " + ", ".join(f"{k} {v}" for k, v in p["stats"]["replaced"].items())
            for p in done
            if p["name"] in ("chunk_allreduce", "microbatch_overlap", "schedule_collectives")
        ]
        rows += [(f"{variant} passes", w) for w in what]
    costs = o.get("costs") or {}
    for i, size in enumerate(o.get("sizes", [])):
        cells = []
        for variant, c in costs.items():
            cells.append(
                f"{variant} {c[i]['predicted_ms']:.2f} (comm {c[i]['comm_ms']:.2f}, exposed "
                f"{c[i]['exposed_comm_ms']:.2f})"
            )
        rows.append((f"predicted ms @ {size} tokens", "; ".join(cells)))
    profile = o.get("profile") or {}
    if profile:
        rows.append(
            (
                "all-reduce profile",
                f"{profile['backend']} x{profile['world_size']}, {profile['source']}",
            )
        )
    return _table(rows, "compute/communication overlap (cost model)")


def _memory_plan_table(plans: dict) -> str:
    """One row per phase: the shapes planned for, the arena (planned peak) against the live lower
    bound and one allocation per buffer, and how many nodes were planned / left allocating."""
    rows = []
    for phase, p in plans.items():
        sh = p.get("shapes", {})
        shapes = f"T={sh.get('num_tokens')} B={sh.get('num_seqs')} kv={sh.get('kv_len')}"
        rows.append((f"{phase} shapes", shapes))
        if "error" in p:
            rows.append((f"{phase} arena", f"not planned: {p['error']}"))
            continue
        arena, naive = p["arena_bytes"], p["naive_bytes"]
        ratio = f" ({arena / naive:.0%} of naive)" if naive else ""
        rows.append((f"{phase} arena", f"{_human_bytes(arena)}{ratio}"))
        bound = _human_bytes(p["live_lower_bound_bytes"])
        rows.append((f"{phase} naive / live bound", f"{_human_bytes(naive)} / {bound}"))
        nodes = f"{p['planned']} planned, {p['inplace']} in place, {p['unplanned']} allocating"
        rows.append((f"{phase} nodes", nodes))
    return _table(rows, "memory plan (activation arena)")
