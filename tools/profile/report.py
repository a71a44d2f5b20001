"""The HTML report of `xllm profile ops --html`: one self-contained file (inline CSS and SVG, no
script, nothing fetched), with the tables and three plots: time per op (bars, the unfused
equivalent beside each fused op), time per layer, and one step's timeline."""

from __future__ import annotations

import html
from pathlib import Path

from xllm_compile.tools.profile.table import Table, _cell

_SVG = "http://www.w3.org/2000/svg"
_COLORS = {"xllm": "#3b7dd8", "aten": "#d8893b", "other": "#8a8a8a"}


def _color(name: str) -> str:
    return _COLORS.get(name.split("::")[0], _COLORS["other"])


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in t.rows
    )
    notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in t.notes)
    return f"<h2>{html.escape(t.title)}</h2><table><tr>{head}</tr>{body}</table>{notes}"


def _bars(rows: list[tuple[str, float, float | None]], title: str, unit: str) -> str:
    """Horizontal bars: (label, value, reference value or None) per row."""
    rows = rows[:20]
    top = max([v for _, v, _ in rows] + [r or 0 for _, _, r in rows] + [1e-9])
    bar_h, left, width = 18, 260, 520
    height = len(rows) * (2 * bar_h + 6) + 30
    label = html.escape(title)
    parts = [f'<svg class=plot role=img aria-label="{label}" width="{left + width + 90}" '
             f'height="{height}" xmlns="{_SVG}">']  # fmt: skip
    y = 10
    for label, value, ref in rows:
        w = max(1.0, width * value / top)
        parts.append(
            f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(label)}</text>'
        )
        parts.append(
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{_color(label)}"/>'
        )
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 13}">{value:.1f} {unit}</text>')
        y += bar_h + 2
        if ref is not None:
            w = max(1.0, width * ref / top)
            parts.append(
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 6}" fill="#bbb"/>'
            )
            parts.append(
                f'<text x="{left + w + 4:.1f}" y="{y + 10}" class=small>unfused {ref:.1f}</text>'
            )
        y += bar_h + 4
    parts.append("</svg>")
    return f"<h2>{html.escape(title)}</h2>" + "".join(parts)


def _timeline(events: list[dict]) -> str:
    """The first profiled step's ops on a time axis."""
    if not events:
        return ""
    first = events[0]["step"]
    evs = [e for e in events if e["step"] == first]
    t0 = evs[0]["start_us"]
    span = max(e["start_us"] + e["us"] for e in evs) - t0 or 1.0
    width, lane_h = 1000, 22
    names = sorted({e["name"] for e in evs})
    lane = {n: i for i, n in enumerate(names)}
    height = len(names) * lane_h + 40
    parts = [f'<svg class=plot role=img aria-label="timeline" width="{width + 220}" '
             f'height="{height}" xmlns="{_SVG}">']  # fmt: skip
    for n, i in lane.items():
        parts.append(
            f'<text x="214" y="{i * lane_h + 15}" text-anchor="end">{html.escape(n)}</text>'
        )
    for e in evs:
        x = 220 + width * (e["start_us"] - t0) / span
        w = max(0.8, width * e["us"] / span)
        tip = html.escape(f"{e['name']} ({e['layer']}): {e['us']:.1f} us")
        y, color = lane[e["name"]] * lane_h + 3, _color(e["name"])
        parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{lane_h - 6}" '
                     f'fill="{color}"><title>{tip}</title></rect>')  # fmt: skip
    parts.append(f'<text x="220" y="{height - 8}">0</text><text x="{220 + width}" y="{height - 8}" '
                 f'text-anchor="end">{span / 1000:.2f} ms</text></svg>')  # fmt: skip
    return "<h2>timeline of one step</h2>" + "".join(parts)


def write_html(result: dict, path: Path) -> Path:
    ops = result["ops"]
    op_bars = _bars([(r["op"], r["us_per_step"], r["unfused_us_per_step"]) for r in ops],
                    "time per op (us per step)", "us")  # fmt: skip
    layer_bars = _bars([(r["layer"], r["us_per_step"], None) for r in result["layers"]],
                       "time per layer (us per step)", "us")  # fmt: skip
    body = (
        f"<h1>xllm profile ops: {html.escape(result['what'])}</h1>"
        f"<p>artifact {html.escape(result['artifact'])}; step wall {result['step_ms']} ms</p>"
        + op_bars
        + layer_bars
        + _timeline(result["timeline"])
        + "".join(_table_html(t) for t in result["tables"])
    )
    style = (
        "body{font:14px system-ui,sans-serif;margin:24px;color:#222}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}"
        ".note{color:#555;font-size:12px}svg text{font:12px system-ui,sans-serif}"
        "svg .small{font-size:10px;fill:#555}"
    )
    doc = (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>xllm profile ops</title><style>{style}</style></head><body>{body}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
    return path
