"""A table of results that prints with aligned columns in a terminal and as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """`columns`: the header; `rows`: one list of values per row (numbers right-aligned, text
    left-aligned; None prints as "-"). `notes`: lines printed under the table."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: Any) -> None:
        assert len(values) == len(self.columns), (values, self.columns)
        self.rows.append(list(values))

    def render(self) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        numeric = [
            all(isinstance(r[i], int | float) or r[i] is None for r in self.rows) and self.rows
            for i in range(len(self.columns))
        ]

        def line(values: list[str]) -> str:
            parts = [
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(values, widths, numeric, strict=True)
            ]
            return "  " + "  ".join(parts).rstrip()

        out = [self.title, "-" * len(self.title), line(self.columns)]
        out += [line(r) for r in cells]
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": [dict(zip(self.columns, r, strict=True)) for r in self.rows],
            "notes": self.notes,
        }


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
