"""The report over all jobs of a multirun (run by the sweep callback after the last job)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.schema import PipelineConfig

log = logging.getLogger("pipeline")


def sweep_report(cfg: PipelineConfig, sweep_dir: Path) -> list[Path]:
    """Build the comparison report of a sweep if the report stage exists; returns its files."""
    from pipeline.dag import SPECS, NotImplementedStageError

    if cfg.run.stages and "report" not in cfg.run.stages:
        return []
    try:
        SPECS["report"].load()
    except NotImplementedStageError as exc:
        log.warning("no sweep report: %s", exc)
        return []
    from stages.report import build_sweep_report

    return build_sweep_report(cfg, sweep_dir)
