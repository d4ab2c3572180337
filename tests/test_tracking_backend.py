"""The tracking backend under stress: concurrent first runs, half-migrated databases, a real MLflow
server that goes away, MLFLOW_TRACKING_URI, and a backend that fails in the middle of a job."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from pipeline import tracking
from pipeline.app import run_job
from core.errors import ConfigError
from core.schema import TrackingConfig
from pipeline.tracking_db import inspect_db

from _mlflow_db_helpers import EXPERIMENT, STALE_REVISION, half_migrated_db
from _mlflow_server import MlflowServer, api
from conftest import REPO

HEAD = tracking._schema_ops().head
CALIB_ONLY = ["model=tiny_random", "run.stages=[calibrate]", "calib.nsamples=4", "calib.seqlen=16", "run.device=cpu",
              "run.progress=false"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tcfg_for(db: Path, experiment: str = "autoround-pipeline", **kw) -> TrackingConfig:
    return TrackingConfig(uri=f"sqlite:///{db}", artifact_location=str(db.parent / "mlartifacts"),
                          experiment=experiment, **kw)


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------------------------
# concurrent first runs in a fresh folder
# ---------------------------------------------------------------------------------------------
INIT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pipeline import tracking
    from core.schema import TrackingConfig

    db, go = Path(sys.argv[1]), Path(sys.argv[2])
    tracking._schema_ops()  # imports done: the three processes start the creation together
    (go.parent / f"ready-{os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.002)
    print(tracking.init_backend(TrackingConfig(uri=f"sqlite:///{db}", artifact_location=str(db.parent / "art"))))
""")


@pytest.mark.slow  # multi-process / real-run check: -m slow keeps the default suite under 10 minutes
def test_three_processes_creating_a_fresh_database_at_the_same_moment_all_succeed(tmp_path):
    script, go, db = tmp_path / "init.py", tmp_path / "go", tmp_path / "mlflow.db"
    script.write_text(INIT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(db), str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()  # all three start creating the database now
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {"1"}  # one experiment, created once
    state = inspect_db(db)
    assert state.is_ready(HEAD) and state.leftovers == []
    assert not list(tmp_path.glob(".mlflow.db.build-*"))


@pytest.mark.slow
def test_three_concurrent_first_runs_in_a_fresh_folder_all_finish(tiny_outputs):
    assert not (tiny_outputs / "mlflow.db").exists()
    args = [*CALIB_ONLY, f"run.outputs_dir={tiny_outputs}"]
    procs = [run_cli([*args, f"calib.seed={i}"], cwd=tiny_outputs.parent) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert not any("tracking skipped" in err for _, err in outs)
    runs = tracking.search_runs(tcfg_for(tiny_outputs / "mlflow.db"))
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["params.calib.seed"]) == ["0", "1", "2"]
    assert set(runs["tags.stage.calibrate"]) == {"ran"}


# ---------------------------------------------------------------------------------------------
# half-migrated databases
# ---------------------------------------------------------------------------------------------
def test_mlflow_alone_cannot_open_the_half_migrated_database(tmp_path):
    """The fixture reproduces the failure every later run hit (the reference behaviour)."""
    db = half_migrated_db(tmp_path / "mlflow.db")
    with pytest.raises(Exception, match="table _alembic_tmp_tags already exists"):
        mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()


def test_a_half_migrated_database_with_runs_is_repaired_without_losing_them(tmp_path, caplog):
    db = half_migrated_db(tmp_path / "mlflow.db", runs=2)
    original = sha(db)
    with caplog.at_level(logging.INFO, logger="pipeline.tracking"):
        tracking.init_backend(tcfg_for(db, EXPERIMENT))
    assert inspect_db(db).is_ready(HEAD)
    backups = list(tmp_path.glob("mlflow.db.bak-*"))
    assert len(backups) == 1 and sha(backups[0]) == original  # the file as it was, kept
    assert f"the previous file is kept as {backups[0]}" in caplog.text
    runs = tracking.search_runs(tcfg_for(db, EXPERIMENT)).sort_values("tags.mlflow.runName")
    assert list(runs["tags.mlflow.runName"]) == ["old-run-0", "old-run-1"]
    assert list(runs["params.quant.bits"]) == ["2", "3"] and list(runs["metrics.eval.ppl"]) == [10.0, 11.0]
    assert set(runs["status"]) == {"FINISHED"}
    run = tracking.MlflowTracker(tcfg_for(db, EXPERIMENT), {"quant.bits": "4"}, {}, "new-run")
    run.end()
    assert len(tracking.search_runs(tcfg_for(db, EXPERIMENT))) == 3


def test_a_broken_database_without_runs_is_replaced(tmp_path, caplog):
    db = half_migrated_db(tmp_path / "mlflow.db", stale=True)  # cannot be brought forward
    with caplog.at_level(logging.INFO, logger="pipeline.tracking"):
        tracking.init_backend(tcfg_for(db))
    assert inspect_db(db).is_ready(HEAD)
    assert (f"replaced the half-migrated MLflow database {db} (schema revision {STALE_REVISION}, this MLflow writes "
            f"{HEAD}; leftover tables _alembic_tmp_tags; 0 recorded runs) by a new one: it held no runs") in caplog.text


def test_a_broken_database_with_runs_is_left_untouched_and_explained(tmp_path):
    db = half_migrated_db(tmp_path / "mlflow.db", runs=2, stale=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    original = sha(db)
    with pytest.raises(ConfigError) as err:
        tracking.init_backend(tcfg_for(db))
    assert sha(db) == original and sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["mlflow.db.lock"])
    msg = str(err.value)
    assert msg.startswith(f"tracking.uri=sqlite:///{db} is an MLflow database this version cannot use (schema "
                          f"revision {STALE_REVISION}, this MLflow writes {HEAD}; leftover tables _alembic_tmp_tags; "
                          "2 recorded runs; bringing a copy to the current schema failed (OperationalError: ")
    assert msg.endswith("the file was left untouched, its runs with it: restore a backup taken before the failed "
                        "upgrade, or set its alembic_version to the last schema step it completed and run `mlflow db "
                        f"upgrade sqlite:///{db}`; meanwhile record new runs in another file, e.g. "
                        f"tracking.uri=sqlite:///{tmp_path}/mlflow-new.db")


def skipped_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tracking skipped" in r.getMessage()]


def test_a_job_on_an_unusable_database_runs_untracked_or_fails_when_tracking_is_required(
        tmp_path, compose, fake_dag, caplog, capsys):
    db = half_migrated_db(tmp_path / "mlflow.db", runs=1, stale=True)
    original = sha(db)
    _, dcfg = compose([f"run.outputs_dir={tmp_path}", "run.progress=false"])
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        outcomes = run_job(dcfg, fake_dag)
    assert [o.status for o in outcomes] == ["ran", "ran"] and sha(db) == original
    assert len(skipped_lines(caplog)) == 1 and skipped_lines(caplog)[0].endswith(
        f"meanwhile record new runs in another file, e.g. tracking.uri=sqlite:///{tmp_path}/mlflow-new.db. "
        "The stages run without MLflow (tracking.required=true makes this an error)")
    _, dcfg = compose([f"run.outputs_dir={tmp_path}", "run.progress=false", "tracking.required=true"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_job(dcfg, fake_dag)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and sha(db) == original
    assert err.startswith(f"error: tracking.uri=sqlite:///{db} is an MLflow database this version cannot use")
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# a real MLflow server: MLFLOW_TRACKING_URI, and the server going away
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(folder)
    yield server
    server.stop()


@pytest.mark.slow  # multi-process / real-run check: -m slow keeps the default suite under 10 minutes
def test_runs_go_to_the_server_in_mlflow_tracking_uri_and_are_skipped_when_it_is_down(
        tmp_path, compose, fake_dag, mlflow_server, monkeypatch, caplog, capsys):
    port = mlflow_server.start()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _, dcfg = compose([f"run.outputs_dir={tmp_path}", "run.progress=false"])
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        assert [o.status for o in run_job(dcfg, fake_dag)] == ["ran", "ran"]
    assert skipped_lines(caplog) == [] and not (tmp_path / "mlflow.db").exists()  # not the default sqlite file
    exp = api(port, "experiments/get-by-name?experiment_name=autoround-pipeline")["experiment"]
    found = api(port, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(found) == 1 and found[0]["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in found[0]["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
    assert params["tracking.uri"] == uri and metrics["quantize.value"] == 1.0
    mlflow_server.stop()
    reason = (f"tracking.uri={uri} is not reachable (no answer from {uri}/health: [Errno 111] Connection refused); "
              "start the server or fix tracking.uri (or MLFLOW_TRACKING_URI)")
    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        assert [o.status for o in run_job(dcfg, fake_dag)] == ["cached", "cached"]
    assert time.time() - t0 < 30
    assert skipped_lines(caplog) == [f"tracking skipped: {reason}. The stages run without MLflow "
                                     "(tracking.required=true makes this an error)"]
    _, dcfg = compose([f"run.outputs_dir={tmp_path}", "run.progress=false", "tracking.required=true"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_job(dcfg, fake_dag)
    assert exc.value.code == 2 and capsys.readouterr().err == f"error: {reason}\n"


def test_mlflow_tracking_uri_is_the_default_and_an_explicit_override_wins(compose, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, _ = compose(["run.outputs_dir=/data/out"])
    assert cfg.tracking.uri == "sqlite:////data/out/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg, _ = compose(["run.outputs_dir=/data/out"])
    assert cfg.tracking.uri == "http://mlflow.example:5000"
    cfg, _ = compose(["tracking.uri=sqlite:///x.db"])
    assert cfg.tracking.uri == "sqlite:///x.db"


# ---------------------------------------------------------------------------------------------
# the backend failing in the middle of a job
# ---------------------------------------------------------------------------------------------
def test_a_backend_failing_mid_job_stops_tracking_with_one_line(tmp_path, migrated_db, caplog):
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    calls: list[str] = []

    def broken(*args, **kwargs):
        calls.append("call")
        raise ConnectionError("server went away")

    for required in (False, True):
        run = tracking.MlflowTracker(tcfg_for(tmp_path / "mlflow.db", required=required), {}, {}, "r")
        run.client.log_metric = broken
        run.client.log_batch = broken
        if required:
            with pytest.raises(ConfigError, match=r"tracking.uri=sqlite:///.* is not available \(ConnectionError: "
                                                  r"server went away\)"):
                run.log_metric("quantize.block_loss", 0.5, 0)
            continue
        with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
            run.log_metric("quantize.block_loss", 0.5, 0)
            run.log_metrics({"quantize.seconds": 1.0})
            run.log_metric("quantize.block_loss", 0.25, 1)
        assert calls == ["call"] and run.run_id is None  # one failure, then no more calls
        lines = [r.getMessage() for r in caplog.records if "tracking stopped" in r.getMessage()]
        assert lines == [f"tracking stopped (logging quantize.block_loss failed): tracking.uri=sqlite:///{tmp_path}/"
                         "mlflow.db is not available (ConnectionError: server went away); fix the backend or "
                         "tracking.uri, or set tracking.enabled=false. The stages run without MLflow "
                         "(tracking.required=true makes this an error)"]
        run.end()  # a no-op now, no error
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
