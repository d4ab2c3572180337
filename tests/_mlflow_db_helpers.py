"""Build MLflow sqlite databases in the states that concurrent first runs and killed upgrades leave.

`half_migrated_db` stops the schema at revision 4465047574b1 and leaves the `_alembic_tmp_tags`
copy table that the next step (f5a4f2784254, which rebuilds `tags`) creates: exactly the state
that three racing first-time migrations left in a fresh folder. With `runs`, the database also
holds an experiment and that many finished runs with a param, a metric and a tag each.
(Test helper: builds the old schema with MLflow's own alembic steps.)
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

BROKEN_AT = "4465047574b1"
STALE_REVISION = "bd07f7e963c5"  # the step after it adds runs.deleted_time
EXPERIMENT = "old-experiment"


def _schema_at(path: Path, revision: str) -> None:
    import sqlalchemy
    from alembic import command
    from mlflow.store.db import utils as db_utils
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        InitialBase.metadata.create_all(engine)
        config = db_utils._get_alembic_config(f"sqlite:///{path}")
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def _insert_runs(con: sqlite3.Connection, artifacts: Path, runs: int) -> None:
    ms = 1_700_000_000_000
    con.execute("INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time, "
                "last_update_time) VALUES (1, ?, ?, 'active', ?, ?)", (EXPERIMENT, artifacts.as_uri(), ms, ms))
    for i in range(runs):
        run = f"{i:032x}"
        con.execute("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                    "start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id) "
                    "VALUES (?, ?, 'LOCAL', '', '', 'me', 'FINISHED', ?, ?, '', 'active', ?, 1)",
                    (run, f"old-run-{i}", ms + i, ms + i + 1, (artifacts / run).as_uri()))
        con.execute("INSERT INTO params (key, value, run_uuid) VALUES ('quant.bits', ?, ?)", (str(2 + i), run))
        for table in ("metrics", "latest_metrics"):
            con.execute(f"INSERT INTO {table} (key, value, timestamp, step, is_nan, run_uuid) "
                        "VALUES ('eval.ppl', ?, ?, 0, 0, ?)", (10.0 + i, ms, run))
        con.execute("INSERT INTO tags (key, value, run_uuid) VALUES ('mlflow.runName', ?, ?)", (f"old-run-{i}", run))


def half_migrated_db(path: Path, runs: int = 0, stale: bool = False) -> Path:
    """A database stuck between schema steps with a leftover alembic copy table; returns `path`.

    With `stale`, the recorded revision is STALE_REVISION although the schema is at BROKEN_AT
    (steps applied but not recorded, as a killed non-transactional migration leaves it): MLflow
    cannot bring it forward, because re-running the next step adds a column that exists.
    """
    _schema_at(path, BROKEN_AT)
    with contextlib.closing(sqlite3.connect(path)) as con:
        if runs:
            _insert_runs(con, path.parent / "old-artifacts", runs)
        if stale:
            con.execute("UPDATE alembic_version SET version_num = ?", (STALE_REVISION,))
        con.execute('CREATE TABLE _alembic_tmp_tags ("key" VARCHAR(250) NOT NULL, value VARCHAR(8000), '
                    'run_uuid VARCHAR(32) NOT NULL, CONSTRAINT tag_pk PRIMARY KEY ("key", run_uuid))')
        con.commit()
    return path
