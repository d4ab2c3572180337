"""What a stage runner receives and returns. Stages import these types, nothing else from the runner."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from core.models import ModelHandle
from core.schema import PipelineConfig

# StageContext.variant: what a node scores (pipeline.dag.StageSpec.variant)
QUANTIZED = "quantized"  # the packed checkpoint of this run
BASELINE = "baseline"  # the unquantized model (baseline_evaluate, baseline_benchmark)
# Every stage's wall time, added to its metrics by the runner
SECONDS_METRIC = "seconds"
# The record each sweep job leaves in its output folder: written by pipeline.sweep, read by stages.report
JOB_FILE = "job.json"


@dataclass(frozen=True)
class Artifact:
    """A complete upstream artifact: its folder and manifest."""

    stage: str
    path: Path
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def read_json(self, name: str) -> Any:
        with open(self.path / name) as f:
            return json.load(f)


@dataclass
class StageContext:
    """Everything a stage's `run(ctx)` may use. Write outputs under `workdir` only.

    `workdir` survives a crash: when `resumed` is true it holds what an interrupted earlier
    attempt at the same fingerprint left (quantize resumes from finished blocks).
    """

    cfg: PipelineConfig
    stage: str  # DAG node name, e.g. "evaluate" or "baseline_evaluate"
    variant: str  # QUANTIZED or BASELINE
    workdir: Path
    resumed: bool
    inputs: dict[str, Artifact]
    model: ModelHandle
    device: str  # resolved: "cpu" or "cuda:N"
    dtype: str  # resolved torch dtype name, e.g. "bfloat16"
    progress: bool = True
    log: Callable[[str], None] = print
    # log_metric(name, value, step): name without the stage prefix; forwarded to MLflow.
    log_metric: Callable[[str, float, Optional[int]], None] = lambda name, value, step=None: None

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass
class StageResult:
    """Scalar metrics (logged with the stage prefix) and a short summary for the final table."""

    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    # Output files (relative to workdir) worth attaching to the MLflow run.
    artifacts: list[str] = field(default_factory=list)
