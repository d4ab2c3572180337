"""MLflow tracking. The only module that imports mlflow.

One MLflow run per pipeline job; a multirun gets a parent run that its jobs nest under.
Params are the flattened config with dotted names, metrics carry their stage prefix
(`quantize.seconds`, `eval.persuasion_ppl.word_perplexity`, ...), and every stage's
manifest is logged as an artifact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from pipeline.schema import TrackingConfig

log = logging.getLogger("pipeline.tracking")
PARENT_RUN_FILE = ".mlflow_parent_run_id"
MAX_PARAM_LEN = 6000


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """{'quant': {'bits': 4}} -> {'quant.bits': '4'}; lists become JSON strings."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(obj, default=str) if isinstance(obj, (list, tuple)) else str(obj)
    out[prefix[:-1]] = text[:MAX_PARAM_LEN]
    return out


class NullTracker:
    """Used when tracking.enabled=false: every call is a no-op."""

    run_id: Optional[str] = None

    def log_metric(self, key: str, value: float, step: Optional[int] = None) -> None:
        pass

    def log_stage(self, prefix: str, manifest: dict, path: Path, status: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


def _mlflow(tcfg: TrackingConfig):
    import mlflow

    mlflow.set_tracking_uri(tcfg.uri)
    return mlflow


def init_backend(tcfg: TrackingConfig) -> str:
    """Create the tracking database and the experiment if needed; returns the experiment id.

    Called once before a sweep's jobs start: concurrent first-time schema migrations of a
    new sqlite database crash MLflow 3.17.
    """
    if tcfg.uri.startswith("sqlite:///"):
        Path(tcfg.uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    mlflow = _mlflow(tcfg)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(tcfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = Path(tcfg.artifact_location).expanduser().resolve()
    location.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(tcfg.experiment, artifact_location=location.as_uri())
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(tcfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


class MlflowTracker:
    """An active MLflow run for one pipeline job."""

    def __init__(self, tcfg: TrackingConfig, params: dict[str, str], tags: dict[str, str],
                 run_name: Optional[str] = None, parent_run_id: Optional[str] = None):
        self.tcfg = tcfg
        experiment_id = init_backend(tcfg)
        self.client = _mlflow(tcfg).MlflowClient()
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        self._log_params(params)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metric(self, key: str, value: float, step: Optional[int] = None) -> None:
        self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_stage(self, prefix: str, manifest: dict, path: Path, status: str) -> None:
        """Stage metrics (prefixed), its status tag, its manifest and the files it marked for logging."""
        self.log_metrics({f"{prefix}.{k}": v for k, v in manifest.get("metrics", {}).items()})
        stage = manifest["stage"]
        self.set_tags({f"stage.{stage}": status, f"stage.{stage}.fingerprint": manifest["fingerprint"]})
        self.client.log_artifact(self.run_id, str(path / "manifest.json"), artifact_path=f"manifests/{stage}")
        for rel in manifest.get("log_artifacts", []):
            self.client.log_artifact(self.run_id, str(path / rel), artifact_path=f"{stage}")

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def start_parent_run(tcfg: TrackingConfig, name: str, tags: dict[str, str]) -> str:
    """Create the parent run of a multirun; returns its id."""
    experiment_id = init_backend(tcfg)
    client = _mlflow(tcfg).MlflowClient()
    return client.create_run(experiment_id, run_name=name, tags={**tags, "sweep": "parent"}).info.run_id


def finish_parent_run(tcfg: TrackingConfig, run_id: str, artifacts: Iterable[Path], status: str = "FINISHED") -> None:
    client = _mlflow(tcfg).MlflowClient()
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="report")
    client.set_terminated(run_id, status=status)


def search_runs(tcfg: TrackingConfig, filter_string: str = "") -> Any:
    """Runs of the configured experiment as a pandas DataFrame (for reports and tests)."""
    mlflow = _mlflow(tcfg)
    return mlflow.search_runs(experiment_names=[tcfg.experiment], filter_string=filter_string)
