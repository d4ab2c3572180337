"""Shared fixtures: compose the real conf/, a tiny random Llama, the real SmolLM2 (slow tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
# Fail loudly instead of "no tests collected" if collection silently shrinks.
MIN_TESTS_IN_DEFAULT_RUN = 20

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_finish(session: pytest.Session) -> None:
    markexpr = session.config.getoption("markexpr") or ""
    full_run = not session.config.args or session.config.args == [str(REPO / "tests")] or \
        session.config.args == ["tests"]
    if full_run and markexpr == "not slow and not gpu" and len(session.items) < MIN_TESTS_IN_DEFAULT_RUN:
        raise pytest.UsageError(f"only {len(session.items)} tests collected (expected >= {MIN_TESTS_IN_DEFAULT_RUN}); "
                                "is the test tree broken?")


@pytest.fixture(autouse=True)
def _no_mlflow_tracking_uri(monkeypatch):
    """tracking.uri defaults to MLFLOW_TRACKING_URI: keep a developer's server, or a URI that
    mlflow.set_tracking_uri left in the environment, out of every test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def compose_config(overrides: list[str]):
    """Compose conf/ like `python -m pipeline <overrides>` and return (PipelineConfig, DictConfig)."""
    from pipeline.app import compose_job_config

    return compose_job_config(overrides)


@pytest.fixture
def compose() -> Callable:
    return compose_config


@pytest.fixture
def fake_dag():
    """A two-stage graph (first -> second, both tests/_fake_stages.py:run) to pass to the runner or run_job."""
    from pipeline.dag import Graph, StageSpec
    from _fake_stages import CALLS

    CALLS.clear()
    return Graph((
        StageSpec("first", "_fake_stages:run", params=("calib",), metric_prefix="calib", uses_model=False),
        StageSpec("second", "_fake_stages:run", needs=("first",), params=("quant",), metric_prefix="quantize",
                  uses_model=False),
    ))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A store holding the tiny random model, materialised once per test session."""
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    root = tmp_path_factory.mktemp("tiny_outputs")
    cfg, _ = compose_config(["model=tiny_random", f"run.outputs_dir={root}"])
    prepare_model(cfg.model, ArtifactStore(root / "store"), log=lambda m: None)
    return root / "store"


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An MLflow sqlite DB created once (first-time migrations take seconds); tests copy it."""
    from pipeline import tracking
    from core.schema import TrackingConfig

    root = tmp_path_factory.mktemp("mlflow_template")
    tracking.init_backend(TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", artifact_location=str(root / "mlartifacts")))
    return root / "mlflow.db"


@pytest.fixture
def tiny_outputs(tmp_path, tiny_store) -> Path:
    """A fresh outputs dir whose store already holds the tiny model (hard links, no reconversion)."""
    out = tmp_path / "outputs"
    shutil.copytree(tiny_store / "model", out / "store" / "model", copy_function=os.link)
    return out


@pytest.fixture
def tiny_overrides(tiny_outputs) -> list[str]:
    """Overrides for a fast end-to-end job on the tiny model in a tmp outputs dir. Only keys every method has:
    the default quant=autoround_cpu tunes 10 iterations in batches of 4; add `quant=<option>` for another method."""
    return [
        "model=tiny_random", f"run.outputs_dir={tiny_outputs}", "tracking.enabled=false", "run.progress=false",
        "run.device=cpu", "calib.nsamples=8", "calib.seqlen=32", "quant.group_size=32",
    ]


@pytest.fixture
def tiny_model(tiny_store):
    """(model, tokenizer, handle) for the tiny random Llama in float32 on CPU."""
    from core.models import load_model, load_tokenizer
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    cfg, _ = compose_config(["model=tiny_random"])
    handle = prepare_model(cfg.model, ArtifactStore(tiny_store), log=lambda m: None)
    import torch

    return load_model(handle, torch.float32, "cpu"), load_tokenizer(handle), handle


@pytest.fixture(scope="session")
def smollm2_handle(tmp_path_factory):
    """The real SmolLM2-135M converted from its GGUF (slow tests only)."""
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    cache = Path(os.environ.get("PIPELINE_TEST_CACHE", tmp_path_factory.mktemp("smollm2")))
    cfg, _ = compose_config(["model=smollm2_135m"])
    return prepare_model(cfg.model, ArtifactStore(cache / "store"), log=lambda m: None)
