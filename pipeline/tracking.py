"""MLflow tracking. The only module that imports mlflow.

One MLflow run per pipeline job; a multirun gets a parent run that its jobs nest under.
Params are the flattened config with dotted names, metrics carry their stage prefix
(`quantize.seconds`, `eval.persuasion_ppl.word_perplexity`, ...), and every stage's
manifest is logged as an artifact.

The backend is made usable before a run starts (`init_backend`): a sqlite file is created,
upgraded or repaired by one process at a time (pipeline.tracking_db), a server must answer its
health check. A backend that cannot be used, at the start or later, makes the job run untracked
with one warning line, or stops it with the tracking.uri ConfigError when tracking.required.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from pipeline import tracking_db
from core.errors import ConfigError
from core.schema import TrackingConfig
from pipeline.tracking_db import SchemaOps

log = logging.getLogger("pipeline.tracking")
PARENT_RUN_FILE = ".mlflow_parent_run_id"
MAX_PARAM_LEN = 6000
HEALTH_TIMEOUT_S = 5.0
MIGRATION_LOGGERS = ("alembic", "mlflow.store.db.utils")


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
    """Used when tracking.enabled=false or the backend is unavailable: every call is a no-op."""

    run_id: Optional[str] = None

    def log_metric(self, key: str, value: float, step: Optional[int] = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_stage(self, prefix: str, manifest: dict, path: Path, status: str) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


def _client(tcfg: TrackingConfig) -> Any:
    """A client of tcfg.uri. (Never mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI in this
    process's environment, which would become the next composed config's tracking.uri.)"""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tcfg.uri)


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a `sqlite:///` URI (relative or absolute), else None."""
    return Path(uri[len("sqlite:///"):]).expanduser() if uri.startswith("sqlite:///") else None


def is_local_backend(uri: str) -> bool:
    """sqlite files and plain paths keep artifacts where tracking.artifact_location says; servers keep their own."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Hold these loggers at WARNING: alembic's and MLflow's per-step INFO lines are not the user's business."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.lru_cache(maxsize=1)
def _schema_ops() -> SchemaOps:
    """The sqlite schema steps of the installed MLflow (the helpers behind `mlflow db upgrade`)."""
    import sqlalchemy
    from alembic.script import ScriptDirectory
    from mlflow.store.db import utils as db_utils  # private helpers; mlflow is pinned in pyproject.toml

    with _quiet(*MIGRATION_LOGGERS):
        script = ScriptDirectory.from_config(db_utils._get_alembic_config(""))

    def is_known(revision: str) -> bool:
        try:
            return script.get_revision(revision) is not None
        except Exception:  # alembic raises several types for an unknown id
            return False

    def migrate(path: Path) -> None:
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        try:
            with _quiet(*MIGRATION_LOGGERS):
                if db_utils._all_tables_exist(engine):
                    db_utils._upgrade_db(engine)
                else:
                    db_utils._initialize_tables(engine)
                db_utils._verify_schema(engine)
        finally:
            engine.dispose()

    return SchemaOps(head=script.get_current_head(), is_known=is_known, migrate=migrate)


def check_reachable(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """An http(s) tracking server must answer /health; raises ConfigError naming tracking.uri."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status == 200:
                return
            reason = f"HTTP {resp.status}"
    except (OSError, ValueError) as exc:  # URLError, connection refused, timeout, bad URL
        reason = str(getattr(exc, "reason", exc))
    raise ConfigError("tracking.uri", uri, f"no answer from {url}: {reason}",
                      "start the server or fix tracking.uri (or MLFLOW_TRACKING_URI)", problem="is not reachable")


def _experiment_id(tcfg: TrackingConfig) -> str:
    client = _client(tcfg)
    exp = client.get_experiment_by_name(tcfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_local_backend(tcfg.uri):
        path = Path(tcfg.artifact_location).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        location = path.as_uri()
    try:
        return client.create_experiment(tcfg.experiment, artifact_location=location)
    except Exception:  # another client of a shared server created it first
        exp = client.get_experiment_by_name(tcfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def init_backend(tcfg: TrackingConfig) -> str:
    """Make the tracking backend usable and the experiment exist; returns the experiment id.

    A sqlite database is created, upgraded or repaired by one process at a time (see
    pipeline.tracking_db), and the experiment is created under the same lock. A server must
    answer its health check within a few seconds.
    """
    path = sqlite_path(tcfg.uri)
    if path is None:
        check_reachable(tcfg.uri)
        return _experiment_id(tcfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tracking_db.file_lock(tracking_db.lock_path(path)):
        tracking_db.prepare_sqlite(tcfg.uri, path, _schema_ops(), log.info)
        return _experiment_id(tcfg)


def unavailable(tcfg: TrackingConfig, exc: BaseException) -> ConfigError:
    """The one-line error for a tracking backend that could not be used."""
    if isinstance(exc, ConfigError) and exc.key == "tracking.uri":
        return exc
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return ConfigError("tracking.uri", tcfg.uri, f"{type(exc).__name__}: {first}",
                       "fix the backend or tracking.uri, or set tracking.enabled=false", problem="is not available")


def skip_or_raise(tcfg: TrackingConfig, exc: BaseException, what: str = "tracking skipped") -> None:
    """Raise the ConfigError when tracking.required, else log one line saying tracking is off."""
    err = unavailable(tcfg, exc)
    if tcfg.required:
        raise err from exc
    log.warning("%s: %s. The stages run without MLflow (tracking.required=true makes this an error)", what, err)


def open_run(tcfg: TrackingConfig, params: dict[str, str], tags: dict[str, str], run_name: Optional[str] = None,
             parent_run_id: Optional[str] = None) -> Any:
    """An MlflowTracker, or a NullTracker (with one warning line) when the backend is unavailable."""
    try:
        return MlflowTracker(tcfg, params, tags, run_name, parent_run_id)
    except Exception as exc:  # any backend failure: an unreachable server, a broken database, permissions
        skip_or_raise(tcfg, exc)
        return NullTracker()


class MlflowTracker:
    """An active MLflow run for one pipeline job.

    A logging call that fails after the run started (the server went away, the disk is full)
    stops tracking for the rest of the job with one warning line, or raises the tracking.uri
    ConfigError when tracking.required; the stages go on either way unless it is required.
    """

    def __init__(self, tcfg: TrackingConfig, params: dict[str, str], tags: dict[str, str],
                 run_name: Optional[str] = None, parent_run_id: Optional[str] = None):
        self.tcfg = tcfg
        experiment_id = init_backend(tcfg)
        self.client = _client(tcfg)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id: Optional[str] = run.info.run_id
        self._log_params(params)

    def _guard(self, what: str, call: Callable[[], None], may_raise: bool = True) -> None:
        if self.run_id is None:  # tracking stopped earlier in this job
            return
        try:
            call()
        except Exception as exc:  # see the class docstring
            self.run_id = None
            if may_raise:
                skip_or_raise(self.tcfg, exc, what=f"tracking stopped ({what} failed)")
            else:
                log.warning("tracking stopped (%s failed): %s", what, unavailable(self.tcfg, exc))

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metric(self, key: str, value: float, step: Optional[int] = None) -> None:
        self._guard(f"logging {key}", lambda: self.client.log_metric(self.run_id, key, float(value), step=step or 0))

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if isinstance(v, (int, float))]

        def send() -> None:
            for i in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[i:i + 500])

        self._guard("logging metrics", send)

    def log_stage(self, prefix: str, manifest: dict, path: Path, status: str) -> None:
        """Stage metrics (prefixed), its status tag, its manifest and the files it marked for logging."""
        self.log_metrics({f"{prefix}.{k}": v for k, v in manifest.get("metrics", {}).items()})
        stage = manifest["stage"]
        self.set_tags({f"stage.{stage}": status, f"stage.{stage}.fingerprint": manifest["fingerprint"]})

        def send() -> None:
            self.client.log_artifact(self.run_id, str(path / "manifest.json"), artifact_path=f"manifests/{stage}")
            for rel in manifest.get("log_artifacts", []):
                self.client.log_artifact(self.run_id, str(path / rel), artifact_path=f"{stage}")

        self._guard(f"logging the {stage} artifacts", send)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._guard(f"logging {path.name}",
                    lambda: self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard(f"logging {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def set_tags(self, tags: dict[str, str]) -> None:
        def send() -> None:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

        self._guard("setting tags", send)

    def end(self, status: str = "FINISHED") -> None:
        self._guard("ending the run", lambda: self.client.set_terminated(self.run_id, status=status), may_raise=False)


def start_parent_run(tcfg: TrackingConfig, name: str, tags: dict[str, str]) -> Optional[str]:
    """Create the parent run of a multirun; returns its id, or None when the backend is unavailable.

    Raises:
        ConfigError naming tracking.uri when the backend is unavailable and tracking.required.
    """
    try:
        experiment_id = init_backend(tcfg)
        client = _client(tcfg)
        return client.create_run(experiment_id, run_name=name, tags={**tags, "sweep": "parent"}).info.run_id
    except Exception as exc:  # any backend failure, as in open_run
        skip_or_raise(tcfg, exc, what="tracking skipped for the sweep's parent run")
        return None


def finish_parent_run(tcfg: TrackingConfig, run_id: str, artifacts: Iterable[Path], status: str = "FINISHED") -> None:
    """Log the sweep report to the parent run and close it (a failure is one warning line: the jobs are done)."""
    try:
        client = _client(tcfg)
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="report")
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # the sweep's results are on disk either way
        log.warning("tracking: closing the parent run %s failed: %s", run_id, unavailable(tcfg, exc))


def search_runs(tcfg: TrackingConfig, filter_string: str = "") -> Any:
    """Runs of the configured experiment as a pandas DataFrame with mlflow.search_runs' columns
    (run_id, status, start_time, params.*, metrics.*, tags.*), for reports and tests."""
    import pandas as pd

    client = _client(tcfg)
    exp = client.get_experiment_by_name(tcfg.experiment)
    rows, token = [], None
    while exp is not None:
        page = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time}
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows)
