"""Hydra callbacks: a multirun gets one MLflow parent run and, at the end, a sweep report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("pipeline")


class SweepCallback(Callback):
    """Creates the tracking database and parent run before any sweep job starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import tracking
        from pipeline.app import to_pipeline_config

        cfg = to_pipeline_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.tracking.enabled:
            return
        # The database must exist before parallel jobs start (concurrent first-time
        # migrations crash MLflow 3.17).
        run_id = tracking.start_parent_run(cfg.tracking, f"sweep-{sweep_dir.name}",
                                           {"sweep_dir": str(sweep_dir.resolve())})
        (sweep_dir / tracking.PARENT_RUN_FILE).write_text(run_id)
        log.info("MLflow parent run %s for sweep %s", run_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import tracking
        from pipeline.app import to_pipeline_config
        from pipeline.sweep import sweep_report

        cfg = to_pipeline_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        artifacts = sweep_report(cfg, sweep_dir)
        parent_file = sweep_dir / tracking.PARENT_RUN_FILE
        if cfg.tracking.enabled and parent_file.is_file():
            tracking.finish_parent_run(cfg.tracking, parent_file.read_text().strip(), artifacts)
