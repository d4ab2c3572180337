"""Hydra callbacks: a multirun gets one MLflow parent run and, at the end, a sweep report.

Order of events in a multirun:
1. on_multirun_start (launcher process): check the outputs folder and the sweep's own parameters
   (hydra.sweeper.params, e.g. from conf/experiment/compare_methods.yaml) like command-line
   overrides, create the parent run (when the tracking backend is available), write its id into
   <sweep_dir>/.mlflow_parent_run_id;
2. each job (in whichever process the launcher uses) claims a GPU of its own when several are
   visible (on_job_start, see claim_gpu), nests its MLflow run under the parent and, in
   on_job_end, writes <job output dir>/job.json: status, overrides and the artifacts it produced;
3. on_multirun_end (launcher process): pipeline.sweep.sweep_report reads the job.json files,
   writes the comparison report and logs it to the parent run.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("pipeline")
GPU_LOCK = ".gpu-{}.lock"
# Lock files of the GPUs this process claimed: held (open) for the life of the process.
_CLAIMED: dict[str, Any] = {}


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def claim_gpu(lock_dir: Path, job_num: int = 0) -> Optional[str]:
    """Give this process one GPU of its own among several visible ones; returns the id or None.

    Each process claims a free GPU by holding an exclusive lock file `<lock_dir>/.gpu-<id>.lock`
    for its lifetime, then narrows CUDA_VISIBLE_DEVICES to it (before CUDA starts in this
    process). With the joblib launcher and n_jobs = number of GPUs, every worker process ends up
    on its own GPU; a reused worker keeps its GPU. Does nothing when at most one GPU is visible
    (e.g. SLURM already gave the job its own GPU).
    """
    if "gpu" in _CLAIMED:
        return _CLAIMED["gpu"]
    gpus = visible_gpus()
    if len(gpus) <= 1:
        return None
    lock_dir.mkdir(parents=True, exist_ok=True)
    order = gpus[job_num % len(gpus):] + gpus[:job_num % len(gpus)]
    for blocking in (False, True):  # first any free GPU; if all are taken, wait for ours
        for gpu in order if not blocking else order[:1]:
            fh = open(lock_dir / GPU_LOCK.format(gpu), "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                fh.close()
                continue
            _CLAIMED.update(gpu=gpu, lock=fh)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            log.info("sweep job %d: process %d uses GPU %s (CUDA_VISIBLE_DEVICES=%s)", job_num, os.getpid(), gpu, gpu)
            return gpu
    return None


def check_sweep_params(config: DictConfig) -> None:
    """Check `hydra.sweeper.params` like command-line overrides (unknown keys, bad values).

    Raises:
        core.errors.ConfigError naming the key, the value, what is allowed and a fix.
    """
    from pipeline.app import CONF_DIR
    from pipeline.overrides import check_cli_overrides

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if not params:
        return
    overrides = [f"{key}={value}" for key, value in OmegaConf.to_container(params, resolve=False).items()]
    check_cli_overrides(overrides, Path(CONF_DIR))


def check_outputs_dir(config: DictConfig) -> None:
    """Exit 2 with one line if run.outputs_dir cannot be used, before Hydra creates its folders there.

    (A literal `run.outputs_dir=` on the command line was checked even earlier, in pipeline.app.main.)
    """
    from core.errors import ConfigError
    from pipeline.validate import check_writable

    try:
        check_writable("run.outputs_dir", str(OmegaConf.select(config, "run.outputs_dir")), create=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class SweepCallback(Callback):
    """Checks the outputs folder before Hydra writes there; creates the sweep's parent run first."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_outputs_dir(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import tracking
        from pipeline.app import to_pipeline_config
        from core.errors import ConfigError

        check_outputs_dir(config)
        try:
            check_sweep_params(config)
        except ConfigError as exc:
            print(f"error: hydra.sweeper.params: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        cfg = to_pipeline_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.tracking.enabled:
            return
        try:
            run_id = tracking.start_parent_run(cfg.tracking, f"sweep-{sweep_dir.name}",
                                               {"sweep_dir": str(sweep_dir.resolve())})
        except ConfigError as exc:  # the backend is unavailable and tracking.required=true
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if run_id is None:
            return
        (sweep_dir / tracking.PARENT_RUN_FILE).write_text(run_id)
        log.info("MLflow parent run %s for sweep %s", run_id, sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        if OmegaConf.select(config, "run.device", default="auto") not in ("auto", "cuda"):
            return  # an explicit cuda:N (or cpu) is respected
        if (OmegaConf.select(config, "run.nproc_per_node", default=1) or 1) > 1:
            return  # a data-parallel job's quantize ranks use the visible GPUs, one each
        claim_gpu(Path(config.hydra.sweep.dir), int(OmegaConf.select(config, "hydra.job.num", default=0) or 0))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from pipeline.sweep import write_job_record

        out_dir = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if out_dir:
            write_job_record(Path(out_dir), job_return, OmegaConf.select(config, "model.name", default=None))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline import tracking
        from pipeline.app import to_pipeline_config
        from pipeline.sweep import sweep_report

        from core.errors import ConfigError, InputError

        cfg = to_pipeline_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        status = "FINISHED"
        try:
            artifacts = sweep_report(cfg, sweep_dir)
        except (ConfigError, InputError) as exc:
            print(f"error: sweep report: {exc}", file=sys.stderr)
            artifacts, status = [], "FAILED"
        for path in artifacts:
            if path.name == "report.md":
                print(f"\nsweep report: {path}\n\n{path.read_text()}")
        parent_file = sweep_dir / tracking.PARENT_RUN_FILE
        if cfg.tracking.enabled and parent_file.is_file():
            tracking.finish_parent_run(cfg.tracking, parent_file.read_text().strip(), artifacts, status=status)
