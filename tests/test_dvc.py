"""dvc.yaml mirrors pipeline/dag.py, params.yaml is the composition of conf/, and DVC runs the DAG.

The DVC runs happen in a temporary git repository holding a copy of the code, conf/ (plus a
tiny-model experiment) and the DVC files, with DVC_NO_ANALYTICS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.dag import STAGES

REPO = Path(__file__).resolve().parent.parent
EXPORT = "outputs/dvc"
# Code each stage module needs besides its own file (core/, pipeline/ and the registry are always deps).
CODE_DEPS = {
    "calibrate": ("stages/calibrate.py", "stages/calib_sources.py", "stages/data"),
    "quantize": ("stages/quantize.py", "stages/quant"),
    "recover": ("stages/recover.py", "stages/recovery"),
    "pack": ("stages/pack.py", "stages/formats"),
    "baseline_evaluate": ("stages/evaluate.py", "stages/eval", "stages/tasks"),
    "evaluate": ("stages/evaluate.py", "stages/eval", "stages/tasks", "stages/formats"),
    "baseline_benchmark": ("stages/benchmark.py", "stages/bench"),
    "benchmark": ("stages/benchmark.py", "stages/bench", "stages/formats"),
    "report": ("stages/report.py", "stages/report_plots.py", "stages/report_reference.py"),
}
TINY_EXPERIMENT = """# @package _global_
defaults:
  - override /model: tiny_random
calib: {nsamples: 8, seqlen: 32}
quant: {iters: 2, batch_size: 4, group_size: 32}
eval: {limit: 4, batch_size: 4, max_length: 64, perplexity: {seqlen: 32, stride: 32, max_windows: 2}}
bench: {num_prompts: 2, input_len: 8, output_len: 4, warmup: 0, repeats: 1}
run: {device: cpu, progress: false}
tracking: {enabled: false}
"""


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _names(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def expected_params(spec) -> set[str]:
    params = set(spec.params)
    if spec.uses_model:
        params.add("model")
    if spec.device_sensitive:
        params.add("run.device")
    return params


def _covered(key: str, listed: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in listed)


# ---------------------------------------------------------------------------------------------
# drift between dvc.yaml, the DAG and conf/
# ---------------------------------------------------------------------------------------------
def test_dvc_yaml_has_exactly_the_dag_stages():
    assert list(dvc_stages()) == [s.name for s in STAGES]


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_dvc_stage_mirrors_its_dag_node(spec):
    stage = dvc_stages()[spec.name]
    cmd = stage["cmd"]
    assert cmd.startswith("python -m pipeline --config-dir . --config-name params ")
    assert f"'run.stages=[{spec.name}]'" in cmd and f"run.export_dir={EXPORT}" in cmd
    assert re.findall(r"run\.stages=\[([^\]]*)\]", cmd) == [spec.name]  # one node per DVC stage
    deps = _names(stage["deps"])
    assert {"core", "pipeline"} <= set(deps) and set(CODE_DEPS[spec.name]) <= set(deps)
    assert spec.impl.split(":")[0].replace(".", "/") + ".py" in deps
    upstream = {d[len(EXPORT) + 1:] for d in deps if d.startswith(EXPORT + "/")}
    assert upstream == set(spec.needs) | set(spec.optional_needs)
    missing = [k for k in expected_params(spec) if not _covered(k, stage["params"])]
    assert not missing, f"dvc.yaml stage {spec.name} lacks params {missing}"
    assert _names(stage["outs"]) == [f"{EXPORT}/{spec.name}"]
    assert _names(stage["metrics"]) == [f"{EXPORT}/{spec.name}.metrics.json"]
    assert stage.get("always_changed", False) == spec.name.endswith("benchmark")


def test_dvc_code_deps_exist():
    missing = [(name, dep) for name, stage in dvc_stages().items() for dep in _names(stage["deps"])
               if not dep.startswith(EXPORT) and not (REPO / dep).exists()]
    assert missing == []


def test_dvc_config_enables_hydra_composition():
    text = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"\[hydra\]\s*\n\s*enabled = true", text)
    assert "config_dir = conf" in text and "config_name = config" in text


def compose_params(overrides: list[str], conf_dir: Path = REPO / "conf", plugins: Path = REPO) -> dict:
    """What `dvc exp run -S ...` writes to params.yaml (DVC's own composition function)."""
    from pipeline.dvc_params import compose_params as compose_text

    return yaml.safe_load(compose_text(overrides, conf_dir, plugins))


def test_params_yaml_is_the_composition_of_conf():
    from pipeline.dvc_params import compose_params as compose_text

    assert (REPO / "params.yaml").read_text() == compose_text([]), (
        "params.yaml drifted from conf/; regenerate it: python -m pipeline.dvc_params")


def test_dvc_set_param_composes_without_hydra_interpolations():
    params = compose_params(["quant.bits=2", "+experiment=smollm2_w2_g64"])
    assert params["quant"]["bits"] == 2 and params["quant"]["iters"] == 200 and params["calib"]["seqlen"] == 512
    assert "hydra" not in params
    assert "${" not in yaml.safe_dump(params)  # every interpolation resolved at composition time
    assert params["tracking"]["uri"] == "sqlite:///outputs/mlflow.db"


def test_pipeline_reads_params_yaml_like_conf(compose, tmp_path):
    """The DVC command (--config-dir . --config-name params) yields the same typed config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.app import to_pipeline_config

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose_params(["quant.bits=3"])))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        from_params = to_pipeline_config(hydra_compose(config_name="params", overrides=["run.stages=[quantize]"]))
    from_conf, _ = compose(["quant.bits=3", "run.stages=[quantize]"])
    assert from_params == from_conf


# ---------------------------------------------------------------------------------------------
# DVC runs in a temporary git repository
# ---------------------------------------------------------------------------------------------
def _copy(src: Path, dest: Path) -> None:
    """Real copies (not hard links): edits to the working tree during the test must not leak in."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if src.is_dir():
        shutil.copytree(src, dest, ignore=ignore)
    else:
        shutil.copy2(src, dest)


def dvc_env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", PATH=bindir + os.pathsep + os.environ["PATH"],
                GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@example.com")


def sh(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=dvc_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def dvc_repo(tmp_path, tiny_store) -> Path:
    """A git + DVC repository with the code, conf/ (+ experiment test_tiny) and a tiny params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("core", "pipeline", "stages", "conf", "hydra_plugins", "dvc.yaml", ".dvcignore"):
        _copy(REPO / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (repo / ".gitignore").write_text("__pycache__/\n/outputs/store/\n/outputs/runs/\n")
    (repo / "conf" / "experiment" / "test_tiny.yaml").write_text(TINY_EXPERIMENT)
    params = compose_params(["+experiment=test_tiny"], repo / "conf", repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_store / "model", repo / "outputs" / "store" / "model", copy_function=os.link)
    sh(["git", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "tiny"], repo)
    return repo


def dvc(repo: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], repo, timeout)


@pytest.mark.slow
def test_dvc_repro_exports_artifacts_and_links_restored_outputs_back(dvc_repo):
    from core.store import ArtifactStore, import_exported

    dvc(dvc_repo, "repro", "calibrate")
    out = dvc_repo / EXPORT / "calibrate"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "calibrate" and manifest["config"]["calib"]["nsamples"] == 8
    store_copy = dvc_repo / "outputs" / "store" / "calibrate" / manifest["fingerprint"]
    assert (store_copy / "manifest.json").read_text() == (out / "manifest.json").read_text()
    assert json.loads((dvc_repo / EXPORT / "calibrate.metrics.json").read_text()) == manifest["metrics"]
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())["stages"]["calibrate"]
    assert lock["params"]["params.yaml"]["calib"]["nsamples"] == 8
    assert "Data and pipelines are up to date." in dvc(dvc_repo, "status", "calibrate").stdout
    # a fresh clone after `dvc pull` has the exported output but no store
    shutil.rmtree(dvc_repo / "outputs" / "store" / "calibrate")
    other = ArtifactStore(dvc_repo / "outputs" / "store").entry("calibrate", "0" * 16)
    assert not import_exported(out, other)  # a different fingerprint is not taken
    proc = dvc(dvc_repo, "repro", "quantize")
    assert "Stage 'calibrate' didn't change, skipping" in proc.stdout
    assert "[calibrate] imported from outputs/dvc/calibrate (restored by DVC)" in proc.stdout + proc.stderr
    quant = json.loads((dvc_repo / EXPORT / "quantize" / "manifest.json").read_text())
    assert quant["inputs"]["calibrate"] == manifest["fingerprint"]
    assert (store_copy / "manifest.json").is_file()


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_dag_then_exp_run_changes_bits(dvc_repo):
    dvc(dvc_repo, "repro", timeout=1800)
    for spec in STAGES:
        if spec.name == "recover":  # recover.mode=none switches the node off: its output is a marker
            assert json.loads((dvc_repo / EXPORT / "recover" / "skipped.json").read_text())["stage"] == "recover"
            continue
        manifest = json.loads((dvc_repo / EXPORT / spec.name / "manifest.json").read_text())
        assert manifest["stage"] == spec.name
    shown = json.loads(dvc(dvc_repo, "metrics", "show", "--json").stdout)
    assert shown, "dvc metrics show returned nothing"
    again = dvc(dvc_repo, "repro", timeout=1800).stdout
    assert "Stage 'quantize' didn't change, skipping" in again
    assert "Running stage 'benchmark'" in again  # always_changed
    sh(["git", "add", "-A"], dvc_repo)
    sh(["git", "commit", "-q", "-m", "ran"], dvc_repo)
    dvc(dvc_repo, "exp", "run", "-S", "+experiment=test_tiny", "-S", "quant.bits=2", timeout=1800)
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    assert params["quant"]["bits"] == 2 and params["model"]["name"] == "tiny-random-llama"
    quant = json.loads((dvc_repo / EXPORT / "quantize" / "manifest.json").read_text())
    assert quant["config"]["quant"]["bits"] == 2
