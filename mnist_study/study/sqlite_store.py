"""An MLflow SQLite store as a file: built whole under another name and renamed into
place, so that a kill while MLflow creates its tables cannot leave it half-built; and
refused in one line when it is half-built (by an older version) or corrupt."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from mlflow.tracking import MlflowClient

from mnist_study.errors import ConfigError


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// store; None for servers and other databases."""
    prefix = "sqlite:///"
    return Path(tracking_uri.removeprefix(prefix)) if tracking_uri.startswith(prefix) else None


def creation_lock(database: Path) -> Path:
    return database.with_name(database.name + ".create.lock")


def build_store(database: Path) -> None:
    """Create MLflow's tables in `<database>.building`, then rename it to `database`
    (call under creation_lock, when `database` does not exist)."""
    partial = database.with_name(database.name + ".building")
    partial.unlink(missing_ok=True)  # what a killed build left
    MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
    os.replace(partial, database)


def latest_schema() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def check_store_file(tracking_uri: str, database: Path) -> None:
    """Refuse a corrupt store, or one whose tables were never finished, in one line."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
            if con.execute("PRAGMA quick_check(1)").fetchone() != ("ok",):
                raise sqlite3.DatabaseError("its integrity check fails")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            version = (
                con.execute("SELECT version_num FROM alembic_version").fetchall()
                if "alembic_version" in tables
                else []
            )
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"--tracking-uri {tracking_uri}: {database} is corrupt ({exc}); restore it from "
            f"a backup, or give another path"
        ) from None
    head = latest_schema()
    if [v for (v,) in version] == [head]:
        return
    found = version[0][0] if version else "none"
    what = (
        "it holds no runs: remove it and run again"
        if runs == 0
        else f"it holds {runs} runs: back it up, then `mlflow db upgrade {tracking_uri}`"
    )
    raise ConfigError(
        f"--tracking-uri {tracking_uri}: {database} is an unfinished MLflow store (schema "
        f"{found}, this MLflow expects {head}; a command killed while creating it, or an "
        f"older MLflow); {what}"
    )
