"""The quantize stage on several processes: write the job, start torchrun with stages.quant.worker, wait, report.

The pipeline's process keeps the stage's store entry (its lock and its atomic rename); the
ranks work inside the entry's work folder, where rank 0 alone writes (block files, qstate,
block_metrics.json and dist/result.json beside the job). A rank that meets a bad input writes
dist/error-rank<r>.json and exits with status 2: that message becomes the stage's InputError.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from core.errors import InputError
from core.launch import launch, launch_env, torchrun_command, world_size
from core.schema import RunConfig
from stages.quant.job import QuantizeJob

DIST_DIR = "dist"
WORKER_MODULE = "stages.quant.worker"
QUANTIZE_JOB_FILE = "job.json"  # the data-parallel attempt's QuantizeJob, read by every rank
RESULT_FILE = "result.json"


def job_file(workdir: Path) -> Path:
    """Where a launch's job lives (node 0 writes it; every rank, on every node, reads it)."""
    return Path(workdir) / DIST_DIR / QUANTIZE_JOB_FILE


def error_file(job: Path, rank: int) -> Path:
    """Where a rank reports a bad input: beside the job file."""
    return Path(job).parent / f"error-rank{rank}.json"


def result_file(job: Path) -> Path:
    """Where rank 0 writes the run's metrics: beside the job file."""
    return Path(job).parent / RESULT_FILE


def _failure(workdir: Path, code: int) -> Exception:
    errors = sorted(job_file(workdir).parent.glob("error-rank*.json"))
    if errors:
        return InputError(json.loads(errors[0].read_text())["message"])
    return RuntimeError(f"the data-parallel quantize workers failed (torchrun exit code {code}; their output is "
                        "above). Finished blocks are kept: run the same command again to resume at the first "
                        "unfinished block")


def run_data_parallel(job: QuantizeJob, run: RunConfig, log: Callable[[str], None],
                      poll: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Quantize with run.nproc_per_node processes on this node (and run.nnodes nodes); returns rank 0's metrics.

    Args:
        poll: called every few seconds while the ranks work (e.g. to log finished blocks).
    Raises:
        InputError for a bad input a rank reported; RuntimeError when the workers failed otherwise.
    """
    workdir = Path(job.workdir)
    shutil.rmtree(workdir / DIST_DIR, ignore_errors=True)
    job.save(job_file(workdir))
    cmd = torchrun_command(run, WORKER_MODULE, [str(job_file(workdir))])
    log(f"[quantize] data-parallel on {world_size(run)} ranks: {' '.join(cmd)}")
    code = launch(cmd, launch_env(run), poll)
    if code != 0:
        raise _failure(workdir, code)
    metrics = json.loads(result_file(job_file(workdir)).read_text())
    shutil.rmtree(workdir / DIST_DIR, ignore_errors=True)
    return metrics
