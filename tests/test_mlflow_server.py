"""A sweep's runs as an MLflow tracking server shows them: parent + children, params, metrics, report.

The runs are written through pipeline.tracking exactly as a multirun writes them (parent run
first, one nested run per job with the flattened config as params and stage-prefixed metrics,
the sweep report logged to the parent), into a tmp sqlite DB. Then `mlflow server` is started on
127.0.0.1 (one worker, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false), queried over its REST API and
stopped by PID.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import tracking
from core.schema import TrackingConfig

from _mlflow_server import MlflowServer, api

METHODS = {"rtn": 30.0, "gptq": 25.0, "autoround": 22.0}  # method -> synthetic eval ppl
BLOCK_LOSSES = [0.5, 0.25, 0.125]


def write_manifest(root: Path, stage: str, fp: str, metrics: dict, config: dict) -> Path:
    path = root / stage / fp
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"stage": stage, "fingerprint": fp, "metrics": metrics,
                                                    "config": config}))
    return path


def log_sweep(tmp_path: Path, compose) -> tuple[TrackingConfig, str, dict[str, str]]:
    """A 3-job sweep (quant=rtn,gptq,autoround) logged like pipeline.app and the sweep callback do."""
    from pipeline.app import job_container
    from stages.report import build_report, write_report

    tcfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "mlartifacts"),
                          experiment="sweep-test")
    parent = tracking.start_parent_run(tcfg, "sweep-test", {"sweep_dir": str(tmp_path / "sweep")})
    children, jobs = {}, []
    for i, (method, ppl) in enumerate(METHODS.items()):
        _, dcfg = compose([f"quant={method}", "quant.bits=2", "model=tiny_random"])
        container = job_container(dcfg)
        run = tracking.MlflowTracker(tcfg, tracking.flatten(container), {"quant.method": method},
                                     f"{method}-w2g64", parent)
        q = write_manifest(tmp_path / "store", "quantize", f"q{i}", {"seconds": 1.0 + i},
                           {"quant": {"method": method, "bits": 2, "group_size": 64, "sym": False, "iters": 2}})
        e = write_manifest(tmp_path / "store", "evaluate", f"e{i}", {"persuasion.ppl": ppl}, {})
        run.log_stage("quantize", json.loads((q / "manifest.json").read_text()), q, "ran")
        run.log_stage("eval", json.loads((e / "manifest.json").read_text()), e, "ran")
        for step, loss in enumerate(BLOCK_LOSSES):
            run.log_metric("quantize.block_loss", loss * (i + 1), step)
        run.end()
        children[method] = run.run_id
        jobs.append((str(i), {"quantize": json.loads((q / "manifest.json").read_text()),
                              "evaluate": json.loads((e / "manifest.json").read_text())}))
    files = write_report(build_report(jobs), tmp_path / "report", plots=False)
    tracking.finish_parent_run(tcfg, parent, files)
    return tcfg, parent, children


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


@pytest.mark.slow
def test_server_lists_the_sweep_runs_params_metrics_and_report(tmp_path, compose, mlflow_server):
    tcfg, parent, children = log_sweep(tmp_path, compose)
    port = mlflow_server.start()
    exp = api(port, f"experiments/get-by-name?experiment_name={tcfg.experiment}")["experiment"]
    found = api(port, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                      "filter": f"tags.mlflow.parentRunId = '{parent}'", "max_results": 100})["runs"]
    assert sorted(r["info"]["run_id"] for r in found) == sorted(children.values())
    by_method = {}
    for run in found:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        by_method[params["quant.method"]] = (run, params, metrics)
        assert run["info"]["status"] == "FINISHED"
    assert sorted(by_method) == sorted(METHODS)
    for i, method in enumerate(METHODS):
        run, params, metrics = by_method[method]
        # the same names in every run, so the compare view lines the methods up
        assert params["quant.bits"] == "2" and params["model.name"] == "tiny-random-llama"
        assert metrics["eval.persuasion.ppl"] == METHODS[method]
        assert metrics["quantize.seconds"] == 1.0 + i
        history = api(port, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=quantize.block_loss")
        assert [(m["step"], m["value"]) for m in history["metrics"]] == \
            [(s, v * (i + 1)) for s, v in enumerate(BLOCK_LOSSES)]
    assert set(by_method["rtn"][1]) == set(by_method["autoround"][1])  # identical param keys
    top = api(port, "runs/search", {"experiment_ids": [exp["experiment_id"]], "filter": "tags.sweep = 'parent'"})["runs"]
    assert [r["info"]["run_id"] for r in top] == [parent] and top[0]["info"]["status"] == "FINISHED"
    listed = api(port, f"artifacts/list?run_id={parent}&path=report")
    assert sorted(Path(f["path"]).name for f in listed["files"]) == ["report.csv", "report.md"]
    mlflow_server.stop()
    assert mlflow_server.proc.returncode is not None and not mlflow_server.healthy()
