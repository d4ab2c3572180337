"""The "Next:" block printed at the end of a job: MLflow command, checkpoint path, what to run next."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from pipeline.next_steps import GPU_EXPERIMENT, format_next_steps


def _outcomes(root: Path, names=("calibrate", "quantize", "pack", "baseline_evaluate", "evaluate")):
    return [SimpleNamespace(name=n, path=root / "store" / n / "abc123") for n in names]


def test_cpu_quickstart_says_where_to_look_and_what_to_run(compose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = compose([])
    text = format_next_steps(cfg, _outcomes(Path("outputs")), "cpu", ["quant.iters=4"])
    lines = text.splitlines()
    assert lines[0] == "Next:"
    assert "mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db" in lines[1]
    assert "outputs/store/pack/abc123/checkpoint" in lines[2]
    assert "python -m pipeline quant.iters=4 eval=local" in lines[3]
    assert GPU_EXPERIMENT in lines[4] and len(lines) == 5


def test_outputs_folder_and_tracking_choices_follow_the_config(compose, tmp_path):
    cfg, _ = compose([f"run.outputs_dir={tmp_path}/o"])
    text = format_next_steps(cfg, _outcomes(tmp_path / "o"), "cpu", [f"run.outputs_dir={tmp_path}/o", "eval.limit=8"])
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/o/mlflow.db" in text
    assert f"{tmp_path}/o/store/pack/abc123/checkpoint" in text
    assert "eval=local" not in text  # the job chose its evaluation itself
    off, _ = compose(["tracking.enabled=false"])
    assert "tracking was off (tracking.enabled=false)" in format_next_steps(off, [], "cpu")
    server, _ = compose(["tracking.uri=http://mlflow.example:5000"])
    assert "open the MLflow server http://mlflow.example:5000" in format_next_steps(server, [], "cpu")


def test_gpu_job_without_pack_prints_only_the_mlflow_line(compose):
    cfg, _ = compose([])
    text = format_next_steps(cfg, _outcomes(Path("outputs"), ("calibrate",)), "cuda:0")
    assert text.splitlines()[0] == "Next:" and len(text.splitlines()) == 2
    assert "mlflow ui" in text and "checkpoint" not in text and GPU_EXPERIMENT not in text
