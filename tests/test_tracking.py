"""MLflow logging of a pipeline job, read back with mlflow.search_runs from a temporary sqlite DB."""

from __future__ import annotations

import mlflow
import pytest

from pipeline import tracking
from pipeline.app import run_job


def test_flatten_uses_dotted_names():
    assert tracking.flatten({"quant": {"bits": 4, "overrides": []}, "run": {"stages": ["a", "b"]}}) == {
        "quant.bits": "4", "quant.overrides": "[]", "run.stages": '["a", "b"]'}


def test_job_is_logged_with_params_metrics_tags_and_artifacts(compose, tmp_path, fake_dag):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"run.outputs_dir={tmp_path}", "run.progress=false", f"tracking.uri={uri}",
                 f"tracking.artifact_location={tmp_path}/art", "tracking.experiment=test-exp", "quant.bits=3"]
    _, dcfg = compose(overrides)
    run_job(dcfg, fake_dag)
    run_job(dcfg, fake_dag)  # second job: stages cached, metrics still logged to its own run
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["test-exp"], order_by=["start_time ASC"])
    assert len(runs) == 2
    for _, run in runs.iterrows():
        assert run["params.quant.bits"] == "3" and run["params.quant.method"] == "autoround"
        assert run["params.model.name"] == "SmolLM2-135M-Instruct"
        assert run["metrics.calib.value"] == 1.0 and run["metrics.quantize.value"] == 1.0
        assert run["metrics.quantize.seconds"] >= 0
        assert run["tags.quant.method"] == "autoround" and run["tags.git_commit"]
        assert run["status"] == "FINISHED"
    assert list(runs["tags.stage.second"]) == ["ran", "cached"]
    client = mlflow.MlflowClient()
    files = {a.path for a in client.list_artifacts(runs.iloc[0]["run_id"])}
    assert {"config", "manifests", "summary.md"} <= files
    manifests = {a.path for a in client.list_artifacts(runs.iloc[0]["run_id"], "manifests")}
    assert manifests == {"manifests/first", "manifests/second"}
    resolved = mlflow.artifacts.load_text(f"runs:/{runs.iloc[0]['run_id']}/config/resolved.yaml")
    assert "bits: 3" in resolved and "hydra" not in resolved


def test_step_metrics_and_parent_run(tmp_path, compose):
    cfg, _ = compose([f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                      "tracking.experiment=steps"])
    parent = tracking.start_parent_run(cfg.tracking, "sweep-x", {"sweep_dir": "x"})
    child = tracking.MlflowTracker(cfg.tracking, {"quant.bits": "2"}, {}, "child", parent)
    for block, loss in enumerate([0.5, 0.25, 0.125]):
        child.log_metric("quantize.block_loss", loss, step=block)
    child.end()
    tracking.finish_parent_run(cfg.tracking, parent, [])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    history = client.get_metric_history(child.run_id, "quantize.block_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.25), (2, 0.125)]
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "FINISHED"


def test_tracking_disabled_writes_no_database(compose, tmp_path, fake_dag):
    _, dcfg = compose([f"run.outputs_dir={tmp_path}", "run.progress=false", "tracking.enabled=false"])
    run_job(dcfg, fake_dag)
    assert not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "store" / "second").is_dir()
