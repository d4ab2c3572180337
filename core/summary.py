"""The table printed at the end of a pipeline job."""

from __future__ import annotations

import os
from typing import Any, Iterable


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def format_summary(outcomes: list) -> str:
    """stage | status | seconds | key metrics | artifact, one row per stage of the job."""
    rows = []
    for o in outcomes:
        shown = o.summary or {k: v for k, v in o.metrics.items() if k != "seconds"}
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in list(shown.items())[:6])
        rel = os.path.relpath(o.path)
        rows.append([o.name, o.status, f"{o.seconds:.1f}", metrics, str(o.path) if rel.startswith("..") else rel])
    return format_table(["stage", "status", "seconds", "key metrics", "artifact"], rows)
