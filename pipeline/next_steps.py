"""What to do after a job: the lines printed under the summary table (browse, use, scale up)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Sequence

from core.schema import PipelineConfig

GPU_EXPERIMENT = "python -m pipeline +experiment=llama3_w4_g128 run.offline=false"
FULL_CPU_EVAL = "eval=local"


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def mlflow_line(cfg: PipelineConfig) -> str:
    """How to look at the tracked run: the MLflow UI command for a local store, or the server."""
    t = cfg.tracking
    if not t.enabled:
        return "tracking was off (tracking.enabled=false): nothing to browse in MLflow"
    if t.uri.startswith(("http://", "https://", "databricks")):
        return f"open the MLflow server {t.uri} (experiment {t.experiment})"
    return f"mlflow ui --backend-store-uri {t.uri}    # then open http://127.0.0.1:5000"


def checkpoint_line(outcomes: Sequence[Any]) -> str:
    """Where the packed checkpoint of this job is, or '' when the job did not include pack."""
    from stages.formats.artifact import checkpoint_dir

    pack = next((o for o in outcomes if o.name == "pack"), None)
    if pack is None:
        return ""
    return f"{_shown(checkpoint_dir(pack.path))}    # a Hugging Face folder; vLLM serves it on a GPU"


def full_eval_line(outcomes: Sequence[Any], overrides: Sequence[str]) -> str:
    """This job again with the fuller offline evaluation (its cached stages are reused), or '' when
    the job evaluated nothing or already chose its evaluation."""
    if not any(o.name == "evaluate" for o in outcomes) or any(o.startswith(("eval=", "eval.")) for o in overrides):
        return ""
    kept = [o for o in overrides if not o.startswith("run.stages=")]
    cmd = " ".join(["python -m pipeline", *(shlex.quote(o) for o in kept), FULL_CPU_EVAL])
    return f"{cmd}    # three tasks, 40 documents each; reuses this checkpoint"


def format_next_steps(cfg: PipelineConfig, outcomes: Sequence[Any], device: str, overrides: Sequence[str] = ()) -> str:
    """The "what next" block printed at the end of a job.

    Args:
        cfg: the job's config (tracking URI, experiment).
        outcomes: the job's stage outcomes (name and artifact path of each stage).
        device: the device the job ran on; on a CPU the block also gives the fuller CPU evaluation
            and the command for a real model on a GPU.
        overrides: the job's command-line overrides (repeated in the fuller-evaluation command).

    Returns:
        A few lines of text, each a command or a path with a short comment.
    """
    rows = [("browse the run", mlflow_line(cfg)), ("packed checkpoint", checkpoint_line(outcomes))]
    if not device.startswith("cuda"):
        rows += [("score it on more text", full_eval_line(outcomes, overrides)),
                 ("a real model (GPU)", f"{GPU_EXPERIMENT}    # Llama-3-8B W4G128: needs the model and a CUDA GPU")]
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(["Next:", *(f"  {label + ':':<{width}} {text}" for label, text in rows if text)])
