"""Multiruns through the basic, joblib and submitit_local launchers; job records; parent MLflow run;
concurrent writers of one artifact; clear failures for a bad sweep key and an empty sweep folder.

The launcher tests run `python -m pipeline -m ...` in a subprocess on the tiny model with only
the calibrate stage (fast, and independent of the heavier stages).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def run_pipeline(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def calib_sweep_args(outputs: Path, tracking: bool = False) -> list[str]:
    args = ["-m", "model=tiny_random", "run.stages=[calibrate]", "calib.nsamples=4,8", "calib.seqlen=16",
            f"run.outputs_dir={outputs}", "run.progress=false", "run.device=cpu",
            f"hydra.sweep.dir={outputs}/sweeps/test"]
    if not tracking:
        args.append("tracking.enabled=false")
    return args


def job_records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/job.json"))}


def assert_two_calibrate_jobs(outputs: Path) -> dict[str, dict]:
    records = job_records(outputs / "sweeps" / "test")
    assert sorted(records) == ["0", "1"]
    for num, nsamples in (("0", 4), ("1", 8)):
        rec = records[num]
        assert rec["status"] == "COMPLETED" and rec["error"] is None
        assert f"calib.nsamples={nsamples}" in rec["overrides"]
        art = Path(rec["stages"]["calibrate"]["path"])
        manifest = json.loads((art / "manifest.json").read_text())
        assert manifest["config"]["calib"]["nsamples"] == nsamples
        assert manifest["fingerprint"] == rec["stages"]["calibrate"]["fingerprint"] == art.name
    assert records["0"]["stages"]["calibrate"]["fingerprint"] != records["1"]["stages"]["calibrate"]["fingerprint"]
    return records


def test_basic_launcher_sweep_nests_runs_under_one_parent(tiny_outputs, migrated_db):
    import shutil

    from pipeline import tracking
    from core.schema import TrackingConfig

    shutil.copy(migrated_db, tiny_outputs / "mlflow.db")
    proc = run_pipeline(calib_sweep_args(tiny_outputs, tracking=True), cwd=tiny_outputs.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_two_calibrate_jobs(tiny_outputs)
    sweep = tiny_outputs / "sweeps" / "test"
    parent_id = (sweep / tracking.PARENT_RUN_FILE).read_text().strip()
    runs = tracking.search_runs(TrackingConfig(uri=f"sqlite:///{tiny_outputs}/mlflow.db"))
    children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert sorted(children["params.calib.nsamples"]) == ["4", "8"]
    assert set(children["status"]) == {"FINISHED"}
    assert sorted(children["tags.stage.calibrate"]) == ["ran", "ran"]
    parent = runs[runs["run_id"] == parent_id].iloc[0]
    assert parent["tags.sweep"] == "parent" and parent["tags.sweep_dir"] == str(sweep.resolve())
    # run.stages has no report: the sweep says so and the parent run is still closed.
    assert "no sweep report" in proc.stderr + proc.stdout
    assert parent["status"] == "FINISHED"


@pytest.mark.slow  # multi-process / real-run check: -m slow keeps the default suite under 10 minutes
def test_joblib_launcher_runs_jobs_in_worker_processes(tiny_outputs, migrated_db):
    import shutil

    from pipeline import tracking
    from core.schema import TrackingConfig

    shutil.copy(migrated_db, tiny_outputs / "mlflow.db")
    args = calib_sweep_args(tiny_outputs, tracking=True) + ["hydra/launcher=joblib_local", "hydra.launcher.n_jobs=2"]
    proc = run_pipeline(args, cwd=tiny_outputs.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert_two_calibrate_jobs(tiny_outputs)
    # two worker processes logged into the one sqlite DB, both nested under the parent
    parent_id = (tiny_outputs / "sweeps" / "test" / tracking.PARENT_RUN_FILE).read_text().strip()
    runs = tracking.search_runs(TrackingConfig(uri=f"sqlite:///{tiny_outputs}/mlflow.db"))
    children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert sorted(children["params.calib.nsamples"]) == ["4", "8"] and set(children["status"]) == {"FINISHED"}


@pytest.mark.slow  # multi-process / real-run check: -m slow keeps the default suite under 10 minutes
def test_submitit_local_launcher_two_job_sweep(tiny_outputs):
    args = calib_sweep_args(tiny_outputs) + ["hydra/launcher=submitit_local_cpu", "hydra.launcher.timeout_min=5"]
    proc = run_pipeline(args, cwd=tiny_outputs.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = assert_two_calibrate_jobs(tiny_outputs)
    submitit = tiny_outputs / "sweeps" / "test" / ".submitit"
    job_folders = [p for p in submitit.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(job_folders) == 2  # one submitit job (its own process, named by pid) per sweep job
    assert all(list(p.glob("*_result.pkl")) for p in job_folders)
    assert len(records) == 2


# ---------------------------------------------------------------------------------------------
# two processes writing the same artifact
# ---------------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from core.store import ArtifactStore

    root, go, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.005)
    entry = ArtifactStore(root).entry("quantize", "f" * 16)
    with entry.writing() as work:
        if work is None:
            with open(log, "a") as f:
                f.write(f"reused {os.getpid()}\\n")
        else:
            with open(log, "a") as f:
                f.write(f"ran {os.getpid()}\\n")
            for i in range(5):  # a slow, multi-file artifact
                (work.path / f"part{i}.bin").write_bytes(bytes([i]) * 100_000)
                time.sleep(0.1)
            work.finish(config={"writer": os.getpid()}, inputs={}, metrics={"value": 1.0})
    print(entry.manifest()["config"]["writer"])
""")


def test_two_processes_writing_the_same_artifact_keep_the_store_consistent(tmp_path):
    from core.store import sha256_file

    script, go, log = tmp_path / "writer.py", tmp_path / "go", tmp_path / "log.txt"
    script.write_text(WRITER)
    root = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(go), str(log)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(1.0)  # both started and waiting
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    lines = sorted(log.read_text().split())
    assert lines.count("ran") == 1 and lines.count("reused") == 1  # computed once, reused once
    assert outs[0] == outs[1]  # both see the same sealed artifact
    folder = root / "quantize"
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["f" * 16]  # no partial/trash
    manifest = json.loads((folder / ("f" * 16) / "manifest.json").read_text())
    assert [o["path"] for o in manifest["outputs"]] == [f"part{i}.bin" for i in range(5)]
    for out in manifest["outputs"]:
        assert sha256_file(folder / ("f" * 16) / out["path"]) == out["sha256"]


@pytest.mark.slow
def test_a_writer_killed_mid_artifact_leaves_nothing_complete_and_the_next_resumes(tmp_path):
    script, go, log = tmp_path / "writer.py", tmp_path / "go", tmp_path / "log.txt"
    script.write_text(WRITER)
    root = tmp_path / "store"
    go.touch()
    first = subprocess.Popen([sys.executable, str(script), str(root), str(go), str(log)], stdout=subprocess.PIPE)
    partial = root / "quantize" / (".partial-" + "f" * 16)
    deadline = time.time() + 30
    while not (partial / "part1.bin").exists() and time.time() < deadline:
        time.sleep(0.02)
    first.kill()
    first.wait()
    assert not (root / "quantize" / ("f" * 16)).exists() and partial.is_dir()
    second = subprocess.run([sys.executable, str(script), str(root), str(go), str(log)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 0, second.stderr
    assert (root / "quantize" / ("f" * 16) / "manifest.json").is_file() and not partial.exists()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_sweep_over_an_unknown_key_fails_before_any_job(tmp_path):
    proc = run_pipeline(["-m", "quant.bitz=2,3", f"run.outputs_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: quant.bitz=2,3 is not a key of quant.method=autoround (the keys of "
                                  "quant.method=autoround: method, bits, ")
    assert "did you mean quant.bits" in proc.stderr
    assert not (tmp_path / "sweeps").exists()


def test_sweep_params_in_a_config_are_checked_like_command_line_ones():
    from pipeline.callbacks import SweepCallback, check_sweep_params

    good = OmegaConf.create({"hydra": {"sweeper": {"params": {"quant": "rtn,gptq", "quant.bits": "2,4"}}}})
    check_sweep_params(good)  # no error
    bad_key = OmegaConf.create({"hydra": {"sweeper": {"params": {"quant.bitz": "2,3"}}}})
    with pytest.raises(ConfigError, match=r"quant.bitz=2,3 is not a key of quant.method=autoround .*did you mean "
                                          r"quant.bits"):
        check_sweep_params(bad_key)
    bad_value = OmegaConf.create({"hydra": {"sweeper": {"params": {"quant.bits": "2,5"}}}})
    with pytest.raises(ConfigError, match=r"quant.bits=5 is not supported \(choose from 2, 3, 4, 8\)"):
        check_sweep_params(bad_value)
    bad_option = OmegaConf.create({"hydra": {"sweeper": {"params": {"quant": "rtn,awq"}}}})
    with pytest.raises(ConfigError, match="quant=awq is not an option of config group quant"):
        check_sweep_params(bad_option)
    with pytest.raises(SystemExit) as exc:
        SweepCallback().on_multirun_start(bad_key)
    assert exc.value.code == 2


def test_report_over_an_empty_sweep_folder_fails_clearly(tmp_path):
    (tmp_path / "sweep").mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", str(tmp_path / "sweep"), "--no-tracking"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: sweep folder {tmp_path / 'sweep'} holds no finished jobs (no */job.json): "
                                   "nothing to report; run the sweep first (python -m pipeline -m ...) or point at "
                                   "its outputs/sweeps/<date_time> folder")


# ---------------------------------------------------------------------------------------------
# one GPU per local sweep process
# ---------------------------------------------------------------------------------------------
CLAIMER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from pipeline.callbacks import claim_gpu

    gpu = claim_gpu(Path(sys.argv[1]), int(sys.argv[2]))
    print(gpu, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    time.sleep(float(sys.argv[3]))
""")


def test_each_local_sweep_process_claims_its_own_gpu(tmp_path):
    script = tmp_path / "claim.py"
    script.write_text(CLAIMER)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="3,5")
    holders = [subprocess.Popen([sys.executable, str(script), str(tmp_path), "0", "3"], env=env, stdout=subprocess.PIPE,
                                text=True)]
    first = holders[0].stdout.readline().split()
    holders.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), "0", "0"], env=env,
                                    stdout=subprocess.PIPE, text=True))
    second = holders[1].stdout.readline().split()
    for p in holders:
        p.wait(timeout=60)
    assert first == ["3", "3"] and second == ["5", "5"]  # job 0 wanted GPU 3; it was taken, so 5
    single = subprocess.run([sys.executable, str(script), str(tmp_path), "1", "0"], capture_output=True, text=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="7"), timeout=60)
    assert single.stdout.split() == ["None", "7"]  # one visible GPU (e.g. SLURM's): left alone


def test_job_record_of_a_finished_and_a_failed_job(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus

    from pipeline.runner import StageOutcome
    from pipeline.sweep import write_job_record

    done = JobReturn(overrides=["quant.bits=2"], status=JobStatus.COMPLETED)
    done.return_value = [StageOutcome("quantize", "cached", 0.51234, "ab" * 8, Path("rel/quantize/abab"))]
    record = json.loads(write_job_record(tmp_path / "0", done, "tiny").read_text())
    assert record == {"status": "COMPLETED", "overrides": ["quant.bits=2"], "model": "tiny", "error": None,
                      "stages": {"quantize": {"fingerprint": "ab" * 8, "path": str(Path("rel/quantize/abab").resolve()),
                                              "status": "cached", "seconds": 0.512}}}
    failed = JobReturn(overrides=["quant.bits=3"], status=JobStatus.FAILED)
    failed.return_value = RuntimeError("out of memory")
    record = json.loads(write_job_record(tmp_path / "1", failed, "tiny").read_text())
    assert record["status"] == "FAILED" and record["error"] == "RuntimeError: out of memory" and record["stages"] == {}
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["job.json"]  # no temp file left
