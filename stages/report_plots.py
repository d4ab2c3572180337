"""PNG plots of the comparison report (matplotlib's object API with the Agg canvas: no pyplot state).

* score_vs_bits.png: each quality metric against bits, one line per method (and group size/sym).
* ppl_vs_iters.png: perplexity against tuning iterations, one series per method and scheme.
* block_losses.png: per-block output MSE of each job, AutoRound's tuning loss (start -> best) and
  GPTQ's layer error (RTN -> GPTQ).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from stages.quant.job import BLOCK_METRICS_FILE

LOWER_IS_BETTER_RE = re.compile(r"(ppl|perplexity|bits_per_byte|nll)$")
MAX_QUALITY_PANELS = 4


def read_block_losses(artifact_dir: Path) -> Optional[list[dict]]:
    """Per-block records from a quantize artifact (the list stages.quantize writes to BLOCK_METRICS_FILE:
    {"block": i, "mse": ..., "loss_init": ..., "loss_best": ..., "best_iter": ..., "seconds": ...}), or None
    when the artifact has no per-block file."""
    path = Path(artifact_dir) / BLOCK_METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _figure(n_panels: int = 1):
    """A figure with n panels: one row up to two, then two columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 2)
    rows = (n_panels + cols - 1) // cols
    fig = Figure(figsize=(5.6 * cols, 4.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _maybe_log(ax: Any, values: list[float]) -> None:
    """Log y only when the values are positive and span more than a factor of 3."""
    if values and min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")


def _is_lower_better(metric: str) -> bool:
    return bool(LOWER_IS_BETTER_RE.search(metric))


def _series_key(row: dict, keys: tuple[str, ...]) -> str:
    parts = [str(row.get("method"))]
    for k in keys:
        if k == "group_size":
            parts.append(f"g{row.get(k)}")
        elif k == "sym":
            parts.append("sym" if row.get(k) else "asym")
        elif k == "bits":
            parts.append(f"W{row.get(k)}")
        elif k == "iters" and row.get(k):
            parts.append(f"i{row.get(k)}")
    return " ".join(parts)


def _varying(rows: list[dict], keys: tuple[str, ...]) -> tuple[str, ...]:
    """The keys whose value differs between rows of the same method (they split a method's line)."""
    out = []
    for k in keys:
        per_method: dict[str, set] = defaultdict(set)
        for r in rows:
            per_method[str(r.get("method"))].add(str(r.get(k)))
        if any(len(v) > 1 for v in per_method.values()):
            out.append(k)
    return tuple(out)


def plot_score_vs_bits(report: Any, out: Path) -> Optional[Path]:
    """Each quality metric against bits; one line per method (+ whichever of group/sym/iters vary)."""
    rows = [r for r in report.quantized_rows() if r.get("bits") is not None]
    ordered = sorted(report.quality, key=lambda m: m != report.ppl_key)  # perplexity first
    metrics = [m for m in ordered if any(r.get(f"eval.{m}") is not None for r in rows)][:MAX_QUALITY_PANELS]
    if not metrics:
        return None
    extra = _varying(rows, ("group_size", "sym", "iters"))
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r.get(f"eval.{metric}") is not None:
                series[_series_key(r, extra)].append((r["bits"], r[f"eval.{metric}"]))
        for name, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for b in report.baseline_rows():
            if b.get(f"eval.{metric}") is not None:
                ax.axhline(b[f"eval.{metric}"], color="gray", linestyle="--", label="baseline")
        if _is_lower_better(metric):
            _maybe_log(ax, [p[1] for s in series.values() for p in s])
        ax.set_xlabel("bits")
        ax.set_ylabel(metric)
        ax.set_xticks(sorted({r["bits"] for r in rows}))
        ax.set_title(f"{metric} vs bits")
        ax.legend(fontsize="small")
    fig.savefig(out, dpi=110)
    return out


def _scheme_key(row: dict, keys: tuple[str, ...]) -> str:
    parts = [f"W{row.get('bits')}"]
    if "group_size" in keys:
        parts.append(f"G{row.get('group_size')}")
    if "sym" in keys:
        parts.append("sym" if row.get("sym") else "asym")
    return " ".join(parts)


def plot_ppl_vs_iters(report: Any, out: Path) -> Optional[Path]:
    """Perplexity against tuning iterations, one line per scheme (bits, group, sym) across the
    methods that have iterations: RTN is iters 0 (AutoRound with iters=0 is RTN), AutoRound at
    its iters. Methods without iterations (GPTQ) are left out of this plot."""
    key = report.ppl_key
    rows = [r for r in report.quantized_rows() if key and r.get(f"eval.{key}") is not None and r.get("iters") is not None]
    if not rows:
        return None
    extra = tuple(k for k in ("group_size", "sym") if len({str(r.get(k)) for r in rows}) > 1)
    series: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for r in rows:
        series[_scheme_key(r, extra)].append((r["iters"], r[f"eval.{key}"], str(r.get("method"))))
    markers = {m: "os^Dvx"[i % 6] for i, m in enumerate(sorted({p[2] for s in series.values() for p in s}))}
    fig, (ax,) = _figure(1)
    for i, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{i % 10}", label=name)
        for x, y, method in points:
            ax.plot([x], [y], marker=markers[method], color=f"C{i % 10}", linestyle="none")
    for method, marker in markers.items():
        ax.plot([], [], marker=marker, color="black", linestyle="none", label=method)
    for b in report.baseline_rows():
        if b.get(f"eval.{key}") is not None:
            ax.axhline(b[f"eval.{key}"], color="gray", linestyle="--", label="baseline")
    _maybe_log(ax, [p[1] for s in series.values() for p in s])
    ax.set_xlabel("iters (0 = no tuning)")
    ax.set_ylabel(key)
    ax.set_title(f"{key} vs iters")
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=110)
    return out


def _numeric_field(records: list[dict], name: str) -> list[tuple[int, float]]:
    return [(int(r["block"]), float(r[name])) for r in records
            if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool) and math.isfinite(r[name])]


def _draw_curves(ax: Any, curves: dict[str, list[dict]], fields: tuple[str, ...], ylabel: str, title: str) -> None:
    styles = ["-", "--", ":", "-."]
    values: list[float] = []
    for i, (label, records) in enumerate(sorted(curves.items())):
        for j, name in enumerate(fields):
            pts = _numeric_field(records, name)
            if not pts:
                continue
            values += [p[1] for p in pts]
            suffix = f": {name}" if len(fields) > 1 else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[j % len(styles)], color=f"C{i % 10}",
                    marker=".", label=label + suffix)
    _maybe_log(ax, values)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="x-small")


# Per-block (before, after) pairs that quantize methods record: (field, field, y label, title).
BEFORE_AFTER = (
    ("loss_init", "loss_best", "tuning loss", "AutoRound: loss at the RTN start -> best iteration"),
    ("layer_mse_rtn", "layer_mse_gptq", "layer output error", "GPTQ: layer error of RTN -> GPTQ"),
)


def plot_block_losses(block_losses: dict[str, list[dict]], out: Path) -> Optional[Path]:
    """Per-block curves: the block output MSE (quantized vs full-precision stream) of every job
    that records it, then one panel per method-specific before/after pair (BEFORE_AFTER)."""
    panels = []
    with_mse = {k: v for k, v in block_losses.items() if v and _numeric_field(v, "mse")}
    if with_mse:
        panels.append((with_mse, ("mse",), "block output MSE", "per-block output MSE vs full precision"))
    for before, after, ylabel, title in BEFORE_AFTER:
        pairs = {k: v for k, v in block_losses.items() if v and _numeric_field(v, before) and _numeric_field(v, after)}
        if pairs:
            panels.append((pairs, (before, after), ylabel, title))
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (curves, fields, ylabel, title) in zip(axes, panels):
        _draw_curves(ax, curves, fields, ylabel, title)
    fig.savefig(out, dpi=110)
    return out


def draw_plots(report: Any, block_losses: dict[str, list[dict]], out_dir: Path) -> tuple[list[Path], list[str]]:
    """All plots that the data allows; returns (files, notes about the plots left out)."""
    files, notes = [], []
    if plot_score_vs_bits(report, out_dir / "score_vs_bits.png") is not None:
        files.append(out_dir / "score_vs_bits.png")
    else:
        notes.append("score vs bits: no evaluate metrics in any job (add evaluate to run.stages)")
    if plot_ppl_vs_iters(report, out_dir / "ppl_vs_iters.png") is not None:
        files.append(out_dir / "ppl_vs_iters.png")
    else:
        notes.append("perplexity vs iters: no perplexity metric in any job (enable eval.perplexity and run evaluate)")
    if plot_block_losses(block_losses, out_dir / "block_losses.png") is not None:
        files.append(out_dir / "block_losses.png")
    else:
        notes.append(f"per-block losses: no job's quantize artifact has per-block mse/loss values ({BLOCK_METRICS_FILE}; "
                     "methods that use no calibration data, such as RTN, record none)")
    return files, notes
