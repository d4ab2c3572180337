"""Safe creation, upgrade and repair of MLflow's sqlite tracking database.

MLflow creates and migrates a new sqlite database the first time a client opens it. Two
processes doing that at once break it (`table _alembic_tmp_tags already exists`), and the
half-migrated file then fails every later run. Here one process at a time (an flock on
`<db>.lock`) brings the database to the current schema, and always on a copy that is renamed
into place only when complete: a race or a crash never leaves a half-migrated file behind.
A half-migrated file made elsewhere (by an older version, or a killed upgrade) is repaired on
a copy; if it holds runs and cannot be repaired, it is left untouched and explained.

Only the standard library is used here; MLflow's schema steps come in as `SchemaOps` (built in
pipeline.tracking, the one module that imports mlflow).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from core.errors import ConfigError

CORE_TABLES = frozenset({"experiments", "runs", "metrics", "params", "tags"})
LEFTOVER_PREFIX = "_alembic_tmp_"  # tables alembic's batch mode copies into and renames back


@dataclass(frozen=True)
class SchemaOps:
    """The MLflow schema as this MLflow version writes it."""

    head: str  # the revision a database must be at
    is_known: Callable[[str], bool]  # a revision this MLflow can upgrade from
    migrate: Callable[[Path], None]  # create or upgrade the sqlite file at this path to `head`


@dataclass
class DbState:
    """What a sqlite file holds, read without changing it (beyond SQLite's own journal recovery)."""

    exists: bool
    tables: list[str] = field(default_factory=list)
    revision: Optional[str] = None
    runs: int = 0
    error: Optional[str] = None  # not readable as an SQLite database

    @property
    def leftovers(self) -> list[str]:
        return sorted(t for t in self.tables if t.startswith(LEFTOVER_PREFIX))

    def is_ready(self, head: str) -> bool:
        return self.revision == head and not self.leftovers and CORE_TABLES <= set(self.tables)

    def describe(self, head: str) -> str:
        parts = [f"schema revision {self.revision or 'none'}, this MLflow writes {head}"]
        if self.leftovers:
            parts.append(f"leftover tables {', '.join(self.leftovers)}")
        missing = sorted(CORE_TABLES - set(self.tables))
        if missing:
            parts.append(f"missing tables {', '.join(missing)}")
        parts.append(f"{self.runs} recorded run{'s' if self.runs != 1 else ''}")
        return "; ".join(parts)


def inspect_db(path: Path) -> DbState:
    """Tables, alembic revision and number of runs of a sqlite file."""
    if not path.is_file() or path.stat().st_size == 0:
        return DbState(exists=path.exists())
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            revision = None
            if "alembic_version" in tables:
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else None
            runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.DatabaseError as exc:
        return DbState(exists=True, error=str(exc))
    return DbState(exists=True, tables=tables, revision=revision, runs=runs)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed), released when the block ends or the process dies."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _resolve_leftovers(con: sqlite3.Connection) -> None:
    """Finish or undo alembic batch copies that a killed migration left behind.

    Alembic copies table X into _alembic_tmp_X, drops X, then renames the copy to X. With X
    still present the copy is incomplete (drop it); without X the copy is the table (rename it).
    """
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for tmp in sorted(t for t in tables if t.startswith(LEFTOVER_PREFIX)):
        original = tmp[len(LEFTOVER_PREFIX):]
        if original in tables:
            con.execute(f'DROP TABLE "{tmp}"')
        else:
            con.execute(f'ALTER TABLE "{tmp}" RENAME TO "{original}"')
    con.commit()


def _build(path: Path, ops: SchemaOps, source: Optional[Path], backup: Optional[Path]) -> None:
    """Write a database at `head` into a temporary file beside `path`, then rename it into place.

    With `source`, start from a consistent copy of it (leftovers resolved); with `backup`, keep
    the replaced file under that name (a hard link: no copy of the data).
    """
    tmp = path.with_name(f".{path.name}.build-{os.getpid()}")
    _remove_db_files(tmp)
    try:
        if source is not None:
            with contextlib.closing(sqlite3.connect(source, timeout=60)) as src, \
                    contextlib.closing(sqlite3.connect(tmp)) as dst:
                src.backup(dst)
                _resolve_leftovers(dst)
        ops.migrate(tmp)
        if backup is not None:
            os.link(path, backup)
        os.replace(tmp, path)
    finally:
        _remove_db_files(tmp)


def _remove_db_files(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal"),
              path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


def _unrepairable(uri: str, path: Path, state: DbState, ops: SchemaOps, why: str, repair: str) -> ConfigError:
    elsewhere = f"tracking.uri=sqlite:///{path.with_name(path.stem + '-new.db')}"
    return ConfigError(
        "tracking.uri", uri, f"{state.describe(ops.head)}; {why}",
        f"the file was left untouched, its runs with it: {repair}; meanwhile record new runs in another file, "
        f"e.g. {elsewhere}", problem="is an MLflow database this version cannot use")


def lock_path(path: Path) -> Path:
    """The lock file that serialises creating, upgrading and repairing the database at `path`."""
    return path.with_name(path.name + ".lock")


def prepare_sqlite(uri: str, path: Path, ops: SchemaOps, log: Callable[[str], None]) -> str:
    """Make `path` a database at the current schema. Call it holding `file_lock(lock_path(path))`.

    Args:
        uri: the tracking URI (for messages).
        path: the database file; its folder must exist.
        ops: the installed MLflow's schema steps.
        log: one line per change made.

    Returns:
        What was done: ready (nothing to do) | created | repaired | replaced.

    Raises:
        ConfigError naming tracking.uri when the file holds runs and cannot be brought to the
        current schema (it is left exactly as it was).
    """
    state = inspect_db(path)
    if state.error is None and state.is_ready(ops.head):
        return "ready"
    if not state.exists or (state.error is None and not state.tables):
        _build(path, ops, None, None)
        log(f"created the MLflow tracking database {path}")
        return "created"
    if state.error is not None:
        raise _unrepairable(uri, path, state, ops, f"it cannot be read as an SQLite database ({state.error})",
                            "restore it from a backup")
    if state.revision is not None and not ops.is_known(state.revision):
        raise _unrepairable(uri, path, state, ops, "its schema revision is unknown to this MLflow (a newer version?)",
                            "use the MLflow version that wrote it")
    return _repair(uri, path, state, ops, log)


def _repair(uri: str, path: Path, state: DbState, ops: SchemaOps, log: Callable[[str], None]) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.bak-{stamp}-{os.getpid()}") if state.runs else None
    try:
        _build(path, ops, path, backup)
    except Exception as exc:  # any failed migration step: decide below from what the file holds
        if state.runs:
            raise _unrepairable(uri, path, state, ops,
                                f"bringing a copy to the current schema failed ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200]})",
                                "restore a backup taken before the failed upgrade, or set its alembic_version to the "
                                f"last schema step it completed and run `mlflow db upgrade {uri}`") from exc
        _build(path, ops, None, None)
        log(f"replaced the half-migrated MLflow database {path} ({state.describe(ops.head)}) by a new one: "
            "it held no runs")
        return "replaced"
    kept = f"; the previous file is kept as {backup}" if backup else ""
    log(f"brought the MLflow database {path} to the current schema ({state.describe(ops.head)}){kept}")
    return "repaired"
