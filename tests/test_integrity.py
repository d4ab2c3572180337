"""Input integrity: safetensors weights checked against their headers and config.json before any
work; stored artifacts checked against their manifests before reuse, and recomputed when corrupted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline.runner import PipelineRunner
from pipeline.runtime import Runtime
from core.store import ArtifactStore, sha256_file
from pipeline.weights_check import check_model_folder, read_header

from conftest import REPO


@pytest.fixture
def model_folder(tiny_store, tmp_path) -> Path:
    """A Hugging Face folder of the tiny random Llama (config.json, model.safetensors, tokenizer), copied."""
    src = next(p for p in (tiny_store / "model").iterdir() if p.is_dir() and not p.name.startswith("."))
    dest = tmp_path / "tiny-model"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("manifest.json"))
    return dest


def _data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()[:keep]
    path.unlink()  # a new file: never write through a hard link into another store
    path.write_bytes(data)


def test_an_intact_folder_passes_and_its_header_matches_what_safetensors_reads(model_folder):
    weights = model_folder / "model.safetensors"
    assert check_model_folder(model_folder) is None
    header = read_header(weights)
    with safe_open(str(weights), "pt") as f:
        assert sorted(header) == sorted(f.keys())
        for name in f.keys():
            tensor = f.get_tensor(name)
            assert header[name] == ("F32", list(tensor.shape))


def test_truncated_weights_are_reported_with_sizes(model_folder):
    weights = model_folder / "model.safetensors"
    full, data = weights.stat().st_size, _data_bytes(weights)
    _truncate(weights, full - 1000)
    assert check_model_folder(model_folder) == (
        f"model.safetensors is truncated: its header describes {data} bytes of tensor data, "
        f"the file holds {data - 1000}")
    with pytest.raises(Exception):  # the safetensors library agrees the file is unusable
        with safe_open(str(weights), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    _truncate(weights, 20)
    assert check_model_folder(model_folder).startswith("model.safetensors is truncated inside its header (20 bytes;")
    _truncate(weights, 3)
    assert check_model_folder(model_folder) == "model.safetensors is 3 bytes, too short for a safetensors header"


def test_weights_that_do_not_fit_config_json_are_reported(model_folder):
    config_path = model_folder / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert check_model_folder(model_folder) == (
        "the weights hold decoder layers 0..1 under model.layers., config.json says num_hidden_layers=3 "
        "(a missing shard or weights of another model?)")
    config_path.write_text(json.dumps({**config, "vocab_size": 1000}))
    assert check_model_folder(model_folder) == (
        "model.embed_tokens.weight has shape [49152, 64], config.json says vocab_size=1000, hidden_size=64 "
        "(weights of another model?)")


def test_a_shard_named_in_the_index_but_missing_is_reported(model_folder):
    (model_folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model.safetensors",
                                        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    assert check_model_folder(model_folder) == (
        "model.safetensors.index.json names model-00002-of-00002.safetensors (for lm_head.weight), "
        "which is not in the folder")


def test_cli_truncated_model_exits_2_with_one_line(model_folder, tmp_path):
    weights = model_folder / "model.safetensors"
    data = _data_bytes(weights)
    _truncate(weights, weights.stat().st_size - 4096)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "model=hf_local", f"model.name_or_path={model_folder}",
                           f"run.outputs_dir={tmp_path}/out", "run.device=cpu"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: model.name_or_path={model_folder} holds damaged weights (model.safetensors is truncated: its header "
        f"describes {data} bytes of tensor data, the file holds {data - 4096}); copy or download the model again, "
        "or save it again with save_pretrained")
    assert not (tmp_path / "out" / "store").exists()  # no stage started


# ---------------------------------------------------------------------------------------------
# the store checks an artifact against its manifest before reusing it
# ---------------------------------------------------------------------------------------------
def _artifact(tmp_path: Path, files: dict[str, bytes]):
    entry = ArtifactStore(tmp_path / "store").entry("calibrate", "fp")
    with entry.writing() as work:
        for name, data in files.items():
            (work.path / name).parent.mkdir(parents=True, exist_ok=True)
            (work.path / name).write_bytes(data)
        work.finish(config={}, inputs={}, metrics={})
    return entry


@pytest.mark.parametrize("damage,problem", [
    (lambda p: _truncate(p / "a.bin", 10), "a.bin has 10 bytes, the manifest says 100"),
    (lambda p: (p / "a.bin").write_bytes(b"y" * 100), "a.bin does not match the sha256 in the manifest"),
    (lambda p: (p / "sub" / "b.json").unlink(), "sub/b.json is missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is unreadable (JSONDecodeError)"),
])
def test_a_damaged_artifact_is_not_reused_and_is_removed(tmp_path, damage, problem):
    entry = _artifact(tmp_path, {"a.bin": b"x" * 100, "sub/b.json": b"{}"})
    lines: list[str] = []
    assert entry.reusable(lines.append) and lines == []
    damage(entry.path)
    assert not entry.reusable(lines.append)
    assert lines == [f"[calibrate] stored artifact {entry.path} is corrupted ({problem}): removed, computing it again"]
    assert not entry.path.exists() and not list(entry.path.parent.glob(".trash-*"))


def test_a_large_file_is_checked_by_size(tmp_path, monkeypatch):
    from core import store

    monkeypatch.setattr(store, "HASH_CHECK_MAX_BYTES", 50)
    entry = _artifact(tmp_path, {"big.bin": b"x" * 100})
    _truncate(entry.path / "big.bin", 99)
    lines: list[str] = []
    assert not entry.reusable(lines.append) and "big.bin has 99 bytes, the manifest says 100" in lines[0]


def test_a_truncated_stored_artifact_is_recomputed_to_the_same_bytes(compose, tiny_overrides):
    cfg, _ = compose([*tiny_overrides, "run.stages=[calibrate,quantize]"])
    lines: list[str] = []
    runner = lambda: PipelineRunner(cfg, Runtime("cpu", "float32", log=lines.append)).run()  # noqa: E731
    first = {o.name: o for o in runner()}
    q_manifest = json.loads((first["quantize"].path / "manifest.json").read_text())
    qstate = first["quantize"].path / "qstate.safetensors"
    _truncate(qstate, qstate.stat().st_size - 100)
    calib = first["calibrate"].path / "calib.safetensors"
    calib_sha = sha256_file(calib)
    flipped = bytearray(calib.read_bytes())
    flipped[-1] ^= 0xFF
    calib.unlink()
    calib.write_bytes(bytes(flipped))
    lines.clear()
    second = {o.name: o for o in runner()}
    assert second["calibrate"].status == "ran" and second["quantize"].status == "ran"
    assert sha256_file(calib) == calib_sha
    recorded = {o["path"]: o["sha256"] for o in q_manifest["outputs"]}
    assert sha256_file(qstate) == recorded["qstate.safetensors"]
    corrupt = [line for line in lines if "is corrupted" in line]
    assert corrupt == [
        f"[calibrate] stored artifact {first['calibrate'].path} is corrupted (calib.safetensors does not match the "
        "sha256 in the manifest): removed, computing it again",
        f"[quantize] stored artifact {first['quantize'].path} is corrupted (qstate.safetensors has "
        f"{qstate.stat().st_size - 100} bytes, the manifest says {qstate.stat().st_size}): removed, computing it again"]
    third = {o.name: o.status for o in runner()}
    assert third == {"calibrate": "cached", "quantize": "cached"}


def test_a_truncated_materialised_model_in_the_store_is_made_again(compose, tiny_outputs):
    from pipeline.models import prepare_model

    cfg, _ = compose(["model=tiny_random", f"run.outputs_dir={tiny_outputs}"])
    store = ArtifactStore(tiny_outputs / "store")
    handle = prepare_model(cfg.model, store, log=lambda m: None)
    weights = Path(handle.path) / "model.safetensors"
    size = weights.stat().st_size
    _truncate(weights, size // 2)
    lines: list[str] = []
    again = prepare_model(cfg.model, store, log=lines.append)
    assert again == handle and weights.stat().st_size == size
    assert check_model_folder(Path(again.path)) is None
    assert lines[0] == (f"[model] stored artifact {handle.path} is corrupted (model.safetensors has {size // 2} "
                        f"bytes, the manifest says {size}): removed, computing it again")
