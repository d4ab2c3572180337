"""Report stage: compare the quantized runs of one job or a whole sweep in a table and plots.

* `build_report(jobs)` is the pure core: each job is its stages' manifests (stage -> manifest),
  the result is a `Report` (rows, columns, notes). A row per quantized job and one per distinct
  baseline (unquantized model) that the jobs were compared against.
* `write_report(report, out_dir, ...)` writes `report.md`, `report.csv` and the PNG plots
  (stages/report_plots.py).
* `run(ctx)` is the per-run `report` DAG node; `build_sweep_report(cfg, sweep_dir)` reports a
  multirun from the `job.json` each sweep job leaves in its output folder.

Columns degrade clearly: a column whose stage was not run in any job is left out and the report
says which stage to add; a job that lacks it shows "-".
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from core.context import BASELINE, JOB_FILE, QUANTIZED, SECONDS_METRIC, StageContext, StageResult
from core.errors import InputError
from core.schema import quant_config_from_record
from stages.benchmark import SPEEDUP_METRIC, TOKENS_PER_S_METRIC
from stages.eval.results import LM_EVAL_PERPLEXITIES, PPL
from stages.formats.artifact import SIZE_METRIC
from stages.quant.driver import PEAK_MEMORY_METRIC

KEY_COLUMNS = ("method", "bits", "group_size", "sym", "iters", "recover")
ADAPTER_METRIC = "adapter_mb"  # the recover stage's LoRA adapter size (stages.recover writes it)


@dataclass(frozen=True)
class CostColumn:
    """A cost/speed column: the stage it comes from, the metric name that stage declares, a unit factor."""

    name: str
    stage: str
    metric: str
    header: str
    scale: float = 1.0  # column value = metric * scale


COST_COLUMNS = (
    CostColumn("quantize_seconds", "quantize", SECONDS_METRIC, "quant s"),
    CostColumn("recover_seconds", "recover", SECONDS_METRIC, "recover s"),
    CostColumn("adapter_mb", "recover", ADAPTER_METRIC, "adapter MB"),
    CostColumn("peak_memory_mb", "quantize", PEAK_MEMORY_METRIC, "peak mem MB", scale=1024.0),  # GiB -> MiB
    CostColumn("size_mb", "pack", SIZE_METRIC, "size MB"),
    CostColumn("tokens_per_s", "benchmark", TOKENS_PER_S_METRIC, "tok/s"),
)
# What to add to run.stages to fill a column, by source stage.
STAGE_HINT = {"evaluate": "evaluate (with baseline_evaluate)", "pack": "pack", "benchmark": "benchmark",
              "quantize": "quantize"}


@dataclass
class Report:
    """A comparison table: `rows` are dicts keyed by `columns` (machine names)."""

    columns: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    quality: list[str] = field(default_factory=list)  # evaluate metric names shown
    ppl_key: Optional[str] = None
    title: str = "Quantization comparison"

    def quantized_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == QUANTIZED]

    def baseline_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == BASELINE]


# ---------------------------------------------------------------------------------------------
# the pure core
# ---------------------------------------------------------------------------------------------
def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def quality_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Each evaluated task's primary metric (stages.eval.results decides which: acc,
    bits_per_byte, ... and `ppl` for the perplexity evaluator), without stderrs or deltas."""
    from stages.eval.results import primary_metric, task_names

    numeric = _numeric(metrics)
    keys = [primary_metric(task, numeric) for task in task_names(numeric)]
    return {k: numeric[k] for k in keys if k is not None}


def metric(manifest: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    """A stage's numeric metric `name` from its manifest, or None when the stage did not record it."""
    return _numeric((manifest or {}).get("metrics", {})).get(name)


def _cost(manifests: Mapping[str, dict], col: CostColumn) -> Optional[float]:
    value = metric(manifests.get(col.stage), col.metric)
    return None if value is None else value * col.scale


def _scheme(quantize: dict, recover: Optional[dict] = None) -> dict[str, Any]:
    """The key columns of a job: its method's scheme and tuning iterations (None: not an iterative method)."""
    quant = quant_config_from_record(quantize.get("config", {}).get("quant", {}))
    scheme: dict[str, Any] = {"method": quant.method, "bits": quant.bits, "group_size": quant.group_size,
                              "sym": quant.sym, "iters": quant.tuning_iters}
    scheme["recover"] = (recover or {}).get("config", {}).get("recover", {}).get("mode", "none")
    return scheme


def _baseline_row(manifests: Mapping[str, dict]) -> dict[str, Any]:
    ev = manifests.get("baseline_evaluate")
    row: dict[str, Any] = {"kind": BASELINE, "label": "baseline (unquantized)", "method": "none"}
    if ev is not None:
        row.update({f"eval.{k}": v for k, v in quality_metrics(ev.get("metrics", {})).items()})
    bench = manifests.get("baseline_benchmark")
    if bench is not None:
        row["tokens_per_s"] = metric(bench, TOKENS_PER_S_METRIC)
        row["speedup"] = 1.0 if row["tokens_per_s"] is not None else None
    return row


def job_label(scheme: Mapping[str, Any]) -> str:
    """'autoround W2G64 asym i200' style label of a quantization scheme."""
    label = f"{scheme.get('method')} W{scheme.get('bits')}G{scheme.get('group_size')}"
    if scheme.get("sym") is False:
        label += " asym"
    if scheme.get("iters"):
        label += f" i{scheme['iters']}"
    if scheme.get("recover") not in (None, "none"):
        label += f" +{scheme['recover']}"
    return label


def _quantized_row(name: str, manifests: Mapping[str, dict], baseline: dict[str, Any]) -> dict[str, Any]:
    scheme = _scheme(manifests["quantize"], manifests.get("recover"))
    row: dict[str, Any] = {"kind": QUANTIZED, "job": name, "label": job_label(scheme), **scheme}
    ev = manifests.get("evaluate")
    if ev is not None:
        for key, value in quality_metrics(ev.get("metrics", {})).items():
            row[f"eval.{key}"] = value
            base = baseline.get(f"eval.{key}")
            if base is not None:
                row[f"delta.{key}"] = value - base
    for col in COST_COLUMNS:
        row[col.name] = _cost(manifests, col)
    row["speedup"] = metric(manifests.get("benchmark"), SPEEDUP_METRIC)
    if row["speedup"] is None and row.get("tokens_per_s") and baseline.get("tokens_per_s"):
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
    return row


def _baseline_key(manifests: Mapping[str, dict]) -> tuple:
    return tuple(manifests[s]["fingerprint"] if s in manifests else None
                 for s in ("baseline_evaluate", "baseline_benchmark"))


def _ppl_key(quality: Iterable[str]) -> Optional[str]:
    """The evaluator's perplexity (stages.eval.results.PPL), else the first lm-eval perplexity metric."""
    keys = sorted(quality)
    if PPL in keys:
        return PPL
    return next((k for k in keys if k.rsplit(".", 1)[-1] in LM_EVAL_PERPLEXITIES), None)


def _columns(rows: list[dict[str, Any]], quality: list[str], ppl_key: Optional[str]) -> list[str]:
    """label, scheme keys, each score with its delta (perplexity first, with its ratio), costs."""
    present = {k for r in rows for k, v in r.items() if v is not None}
    cols = ["label", *KEY_COLUMNS]
    for q in sorted(quality, key=lambda k: k != ppl_key):
        cols.append(f"eval.{q}")
        if f"delta.{q}" in present:
            cols.append(f"delta.{q}")
        if q == ppl_key and "ppl_ratio" in present:
            cols.append("ppl_ratio")
    cols += [c.name for c in COST_COLUMNS if c.name in present]
    if "speedup" in present:
        cols.append("speedup")
    return cols


def _missing_notes(jobs: Sequence[tuple[str, Mapping[str, dict]]], columns: list[str]) -> list[str]:
    notes = []
    ran = {stage for _, m in jobs for stage in m}
    for stage in ("evaluate", "pack", "benchmark"):
        if stage not in ran:
            notes.append(f"no job ran `{stage}`: its columns are left out (add {STAGE_HINT[stage]} to run.stages, "
                         f"or leave run.stages empty for the whole DAG)")
    if "evaluate" in ran and "baseline_evaluate" not in ran:
        notes.append("no baseline evaluation: deltas vs baseline are left out (add baseline_evaluate to run.stages)")
    if "quantize" in ran and "peak_memory_mb" not in columns:
        notes.append("the quantize stage reported no peak-memory metric (it measures GPU memory, on CUDA only): "
                     "the peak memory column is left out")
    return notes


def build_report(jobs: Sequence[tuple[str, Mapping[str, dict]]], title: str = "Quantization comparison") -> Report:
    """Comparison table over jobs, each given as (name, {stage: manifest}).

    Args:
        jobs: one entry per pipeline job; every job must include its `quantize` manifest, the
            other stages (pack, evaluate, baseline_evaluate, benchmark, baseline_benchmark) are optional.
        title: heading of the Markdown report.

    Returns:
        A Report whose rows are the distinct baselines first, then the quantized jobs sorted by
        method, bits, group size, sym, iters.
    """
    if not jobs:
        raise InputError("the report needs at least one job with a quantize manifest; none were given")
    for name, manifests in jobs:
        if "quantize" not in manifests:
            raise InputError(f"job {name} has no quantize manifest (stages present: {', '.join(sorted(manifests)) or 'none'}); "
                             "the report compares quantized models, so run the quantize stage first")
    baselines: dict[tuple, dict[str, Any]] = {}
    rows = []
    for name, manifests in jobs:
        key = _baseline_key(manifests)
        if key not in baselines and key != (None, None):
            baselines[key] = _baseline_row(manifests)
        rows.append(_quantized_row(name, manifests, baselines.get(key, {})))
    rows.sort(key=_sort_key)
    _make_labels_unique(rows)
    quality = sorted({k[len("eval."):] for r in rows for k in r if k.startswith("eval.")})
    ppl_key = _ppl_key(quality)
    _add_ppl_ratio(rows, ppl_key)
    all_rows = list(baselines.values()) + rows
    columns = _columns(all_rows, quality, ppl_key)
    notes = _missing_notes(jobs, columns)
    return Report(columns=columns, rows=all_rows, notes=notes, quality=quality, ppl_key=ppl_key, title=title)


def _sort_key(row: dict[str, Any]) -> tuple:
    def num(key: str) -> float:
        value = row.get(key)
        return float(value) if isinstance(value, (int, float)) else -1.0

    return (str(row.get("method")), num("bits"), num("group_size"), not row.get("sym"), num("iters"),
            str(row.get("recover")), str(row.get("job")))


def _make_labels_unique(rows: list[dict[str, Any]]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["label"]] = seen.get(row["label"], 0) + 1
    for row in rows:
        if seen[row["label"]] > 1:
            row["label"] = f"{row['label']} (job {row['job']})"


def _add_ppl_ratio(rows: list[dict], ppl_key: Optional[str]) -> None:
    """perplexity / baseline perplexity, from the value and its delta."""
    if ppl_key is None:
        return
    for row in rows:
        delta = row.get(f"delta.{ppl_key}")
        value = row.get(f"eval.{ppl_key}")
        if delta is not None and value is not None and value - delta > 0:
            row["ppl_ratio"] = value / (value - delta)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def header(column: str) -> str:
    """Human header of a machine column name."""
    for col in COST_COLUMNS:
        if col.name == column:
            return col.header
    if column.startswith("eval."):
        return column[len("eval."):]
    if column.startswith("delta."):
        return "Δ " + column[len("delta."):]
    return {"label": "run", "group_size": "group", "ppl_ratio": "ppl ×", "speedup": "speedup"}.get(column, column)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def to_markdown(report: Report) -> str:
    """The report as Markdown: a table (baseline rows first) and the notes."""
    heads = [header(c) for c in report.columns]
    lines = [f"# {report.title}", "", "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for row in report.rows:
        cells = [_cell(row.get(c)) if not (row.get("kind") == BASELINE and c in KEY_COLUMNS[1:]) else ""
                 for c in report.columns]
        lines.append("| " + " | ".join(cells) + " |")
    if report.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    """All columns (machine names), one row per baseline and job; empty cells for missing values."""
    cols = ["kind", "job", *[c for c in report.columns]]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in report.rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in cols})


def write_report(report: Report, out_dir: Path, block_losses: Optional[dict[str, list[dict]]] = None,
                 plots: bool = True) -> list[Path]:
    """Write report.md, report.csv and (if `plots`) PNG plots into out_dir; returns the files written.

    Args:
        report: from build_report.
        out_dir: created if missing.
        block_losses: job label -> per-block records (see stages.report_plots.read_block_losses).
        plots: draw the PNG plots too.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table = out_dir / "report.md", out_dir / "report.csv"
    files = [md, table]
    write_csv(report, table)
    text = to_markdown(report)
    if plots:
        from stages.report_plots import draw_plots

        pngs, plot_notes = draw_plots(report, block_losses or {}, out_dir)
        files += pngs
        text += "\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n\n" for p in pngs)
        if plot_notes:
            text += "Not drawn:\n" + "".join(f"- {n}\n" for n in plot_notes)
    md.write_text(text)
    return files


# ---------------------------------------------------------------------------------------------
# the DAG node and the sweep report
# ---------------------------------------------------------------------------------------------
def _block_losses_of(artifact_dirs: Mapping[str, Path]) -> Optional[list[dict]]:
    from stages.report_plots import read_block_losses

    path = artifact_dirs.get("quantize")
    return read_block_losses(path) if path is not None else None


def _derived_metrics(report: Report) -> dict[str, float]:
    row = report.quantized_rows()[0]
    keys = [c for c in report.columns if c.startswith("delta.") or c in ("ppl_ratio", "speedup")]
    return {k: row[k] for k in keys if isinstance(row.get(k), (int, float))}


def run(ctx: StageContext) -> StageResult:
    """Per-run report: this job's table and plots, written into the artifact folder."""
    manifests = {name: art.manifest for name, art in ctx.inputs.items()}
    report = build_report([(ctx.cfg.tracking.run_name or "run", manifests)],
                          title=f"{ctx.cfg.model.name}: quantization report")
    label = report.quantized_rows()[0]["label"]
    losses = _block_losses_of({name: art.path for name, art in ctx.inputs.items()})
    files = write_report(report, ctx.workdir, {label: losses} if losses else {}, plots=ctx.cfg.report.plots)
    for note in report.notes:
        ctx.log(f"[report] {note}")
    return StageResult(metrics=_derived_metrics(report),
                       summary={"report": "report.md", "columns": len(report.columns)},
                       artifacts=[p.name for p in files])


@dataclass
class SweepJob:
    """One job of a multirun as recorded in its job.json."""

    name: str
    record: dict
    manifests: dict[str, dict]
    artifact_dirs: dict[str, Path]


def read_sweep_jobs(sweep_dir: Path) -> list[SweepJob]:
    """Every job.json under a sweep folder, with the manifests of the artifacts it names.

    Raises InputError when the folder is missing or holds no job records.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise InputError(f"sweep folder {sweep_dir} does not exist; pass the folder a multirun wrote "
                         "(outputs/sweeps/<date_time>)")
    records = sorted(sweep_dir.rglob(JOB_FILE), key=lambda p: _natural(p.parent.relative_to(sweep_dir)))
    if not records:
        raise InputError(f"sweep folder {sweep_dir} holds no finished jobs (no */{JOB_FILE}): nothing to report; "
                         "run the sweep first (python -m pipeline -m ...) or point at its outputs/sweeps/<date_time> folder")
    jobs = []
    for path in records:
        record = json.loads(path.read_text())
        manifests, dirs = {}, {}
        for stage, info in record.get("stages", {}).items():
            art = Path(info["path"])
            if (art / "manifest.json").is_file():
                manifests[stage] = json.loads((art / "manifest.json").read_text())
                dirs[stage] = art
        jobs.append(SweepJob(str(path.parent.relative_to(sweep_dir)), record, manifests, dirs))
    return jobs


def _natural(rel: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel.parts)


def _sweep_notes(jobs: list[SweepJob]) -> list[str]:
    notes = []
    for job in jobs:
        overrides = " ".join(job.record.get("overrides", [])) or "(no overrides)"
        if job.record.get("status") != "COMPLETED":
            notes.append(f"job {job.name} ({overrides}) {job.record.get('status', 'FAILED').lower()}: "
                         f"{job.record.get('error') or 'see its log'}")
        else:
            missing = [s for s, info in job.record.get("stages", {}).items()
                       if s not in job.manifests and info.get("status") != "skipped"]
            if missing:
                notes.append(f"job {job.name}: artifacts of {', '.join(missing)} are no longer in the store")
    return notes


def build_sweep_report(cfg: Any, sweep_dir: Path) -> list[Path]:
    """Report over every job of a multirun; files go to `<cfg.report.reports_dir>/<sweep folder name>/`.

    Args:
        cfg: the sweep's PipelineConfig (report.reports_dir and report.plots are used).
        sweep_dir: the multirun folder (Hydra's hydra.sweep.dir).

    Returns:
        The files written (report.md, report.csv, plots).
    """
    jobs = read_sweep_jobs(Path(sweep_dir))
    usable = [j for j in jobs if "quantize" in j.manifests]
    if not usable:
        raise InputError(f"no job of sweep {sweep_dir} produced a quantize artifact "
                         f"({len(jobs)} job records; failures: {'; '.join(_sweep_notes(jobs)) or 'none'})")
    model = next((j.record.get("model") for j in usable if j.record.get("model")), "model")
    report = build_report([(j.name, j.manifests) for j in usable], title=f"{model}: sweep {Path(sweep_dir).name}")
    report.notes += _sweep_notes(jobs)
    losses = {}
    for job, row in zip(usable, _rows_by_job(report, usable)):
        curve = _block_losses_of(job.artifact_dirs)
        if curve:
            losses[row["label"]] = curve
    out_dir = Path(cfg.report.reports_dir) / Path(sweep_dir).name
    files = write_report(report, out_dir, losses, plots=cfg.report.plots)
    if cfg.report.reference_table:
        files += _reference_table(usable, model, out_dir, _sweep_notes(jobs))
    return files


def _reference_table(jobs: list[SweepJob], model: str, out_dir: Path, notes: list[str]) -> list[Path]:
    """reference_table.md/.csv (stages/report_reference.py), also appended to report.md."""
    from stages.report_reference import build_reference_table, in_features_of, to_markdown, write_reference_table

    widths = in_features_of([j.artifact_dirs["quantize"] for j in jobs if "quantize" in j.artifact_dirs])
    table = build_reference_table([(j.name, j.manifests) for j in jobs], model, widths)
    table.notes += notes
    files = write_reference_table(table, out_dir)
    md = out_dir / "report.md"
    md.write_text(md.read_text() + "\n## Reference table\n\n" + to_markdown(table).split("\n", 2)[2])
    return files


def _rows_by_job(report: Report, jobs: list[SweepJob]) -> list[dict]:
    by_name = {r["job"]: r for r in report.quantized_rows()}
    return [by_name[j.name] for j in jobs]
