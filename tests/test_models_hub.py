"""Hub model ids: one clear error when they cannot be resolved, and the resolved commit in the fingerprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import models
from core.errors import ConfigError
from core.schema import ModelConfig

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "example-org/tiny-model"


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    models.hub_commit.cache_clear()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import time by the library
    yield
    models.hub_commit.cache_clear()


def _cached_snapshot(tmp_path: Path, commit: str) -> None:
    """The layout huggingface_hub keeps in its cache: refs/main -> snapshots/<commit>/config.json."""
    repo = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_offline_hub_id_missing_from_the_cache_is_one_clear_error():
    with pytest.raises(ConfigError) as err:
        models.model_commit(ModelConfig(source="hf", name_or_path=HUB_ID), offline=True)
    msg = str(err.value)
    assert msg.startswith(f"model.name_or_path={HUB_ID} is not in the local Hugging Face cache and run.offline=true")
    assert "run.offline=false" in msg and "model=hf_local model.name_or_path=/path/to/folder" in msg


def test_offline_hub_id_in_the_cache_resolves_to_its_commit(tmp_path):
    _cached_snapshot(tmp_path, "a" * 40)
    assert models.model_commit(ModelConfig(source="hf", name_or_path=HUB_ID), offline=True) == "a" * 40


def test_online_commit_goes_into_the_fingerprint_and_pins_the_loads(monkeypatch):
    import huggingface_hub

    commits = iter(["1" * 40, "2" * 40])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, name, revision=None:
                        SimpleNamespace(sha=next(commits)))
    monkeypatch.setattr(models, "is_offline", lambda: False)
    cfg = ModelConfig(source="hf", name_or_path=HUB_ID, gguf_file=None, gguf_package=None)
    first = models.prepare_model(cfg, store=None)
    models.hub_commit.cache_clear()  # the model was re-uploaded: the hub now answers another commit
    second = models.prepare_model(cfg, store=None)
    assert (first.revision, second.revision) == ("1" * 40, "2" * 40)
    assert first.fingerprint != second.fingerprint  # stale stages of the old upload are never reused


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def refuse(self, name, revision=None):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)
    with pytest.raises(ConfigError, match=r"could not be resolved on the Hugging Face hub .*Name or service not known"
                                          r".*check the network"):
        models.model_commit(ModelConfig(source="hf", name_or_path=HUB_ID), offline=False)


def test_local_folders_gguf_and_random_models_have_no_commit(tmp_path):
    assert models.model_commit(ModelConfig(source="hf", name_or_path=str(tmp_path)), offline=True) is None
    assert models.model_commit(ModelConfig(), offline=True) is None  # the GGUF default
    assert models.model_commit(ModelConfig(source="random"), offline=True) is None


def test_the_headline_preset_offline_without_the_model_exits_2_with_one_line(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "+experiment=llama3_w2_g64", "run.offline=true",
                           f"run.outputs_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.name_or_path=meta-llama/Meta-Llama-3-8B is not in")
    assert not (tmp_path / "out" / "mlflow.db").exists()  # failed before tracking started: no FAILED run left
