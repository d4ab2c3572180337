"""The report over all jobs of a multirun, and the job records it is built from.

Each sweep job leaves `<sweep_dir>/<job>/job.json` (written by SweepCallback.on_job_end):

    {"status": "COMPLETED" | "FAILED", "overrides": [...], "model": "...", "error": null | "...",
     "stages": {"quantize": {"fingerprint": "...", "path": "/abs/outputs/store/quantize/<fp>",
                             "status": "ran" | "cached", "seconds": 12.3}, ...}}

After the last job the callback calls `sweep_report`. To (re)build the report of a finished or
interrupted sweep by hand:

    python -m pipeline.sweep outputs/sweeps/<date_time>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from core.context import JOB_FILE
from core.schema import PipelineConfig

log = logging.getLogger("pipeline")


def job_record(job_return: Any, model_name: Optional[str]) -> dict:
    """The job.json content for a Hydra JobReturn whose return value is the runner's outcomes."""
    status = getattr(job_return.status, "name", str(job_return.status))
    value = job_return._return_value  # the public property re-raises a failed job's exception
    record: dict[str, Any] = {"status": status, "overrides": list(job_return.overrides or []),
                              "model": model_name, "error": None, "stages": {}}
    if status == "COMPLETED":
        for outcome in value or []:
            record["stages"][outcome.name] = {"fingerprint": outcome.fingerprint,
                                              "path": str(Path(outcome.path).resolve()),
                                              "status": outcome.status, "seconds": round(outcome.seconds, 3)}
    else:
        record["error"] = f"{type(value).__name__}: {value}"
    return record


def write_job_record(out_dir: Path, job_return: Any, model_name: Optional[str]) -> Path:
    """Write job.json atomically into the job's output folder; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JOB_FILE
    tmp = path.with_name(f".{JOB_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(job_record(job_return, model_name), indent=2))
    os.replace(tmp, path)
    return path


def sweep_report(cfg: PipelineConfig, sweep_dir: Path) -> list[Path]:
    """Build the comparison report of a sweep (unless run.stages leaves the report out); returns its files."""
    if cfg.run.stages and "report" not in cfg.run.stages:
        log.info("no sweep report: run.stages does not include report")
        return []
    from stages.report import build_sweep_report

    return build_sweep_report(cfg, sweep_dir)


def sweep_config(sweep_dir: Path) -> PipelineConfig:
    """The PipelineConfig a sweep ran with (from Hydra's multirun.yaml), or the defaults."""
    from omegaconf import OmegaConf

    from pipeline.app import to_pipeline_config

    saved = sweep_dir / "multirun.yaml"
    if saved.is_file():
        return to_pipeline_config(OmegaConf.load(saved))
    return PipelineConfig()


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m pipeline.sweep SWEEP_DIR`: (re)build a sweep's report; logs it to its parent run."""
    from pipeline import tracking
    from core.errors import ConfigError, InputError
    from stages.report import build_sweep_report, read_sweep_jobs

    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder, e.g. outputs/sweeps/<date_time>")
    parser.add_argument("--reports-dir", help="where to write the report (default: the sweep's report.reports_dir)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--no-tracking", action="store_true", help="do not log the report to the parent MLflow run")
    args = parser.parse_args(argv)
    try:
        cfg = sweep_config(args.sweep_dir)
        cfg.report.plots = cfg.report.plots and not args.no_plots
        if args.reports_dir:
            cfg.report.reports_dir = args.reports_dir
        files = build_sweep_report(cfg, args.sweep_dir)
        jobs = read_sweep_jobs(args.sweep_dir)
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(next(p for p in files if p.name == "report.md").read_text())
    print("written:", *[str(p) for p in files], sep="\n  ")
    parent = args.sweep_dir / tracking.PARENT_RUN_FILE
    if cfg.tracking.enabled and not args.no_tracking and parent.is_file():
        status = "FINISHED" if all(j.record.get("status") == "COMPLETED" for j in jobs) else "FAILED"
        tracking.finish_parent_run(cfg.tracking, parent.read_text().strip(), files, status=status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
