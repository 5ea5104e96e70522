"""An MLflow SQLite store as a file: built whole under another name and renamed into
place, so that a kill while MLflow creates its tables cannot leave it half-built; copied
from an empty template, since MLflow builds a new store by running every migration it
ever had (seconds); and refused in one line when it is half-built or corrupt."""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
from pathlib import Path

from mlflow.tracking import MlflowClient

from mnist_study.errors import ConfigError
from mnist_study.store_paths import file_lock


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// store; None for servers and other databases."""
    prefix = "sqlite:///"
    return Path(tracking_uri.removeprefix(prefix)) if tracking_uri.startswith(prefix) else None


def creation_lock(database: Path) -> Path:
    return database.with_name(database.name + ".create.lock")


def build_store(database: Path) -> None:
    """Copy the empty template to `<database>.building`, then rename it to `database`
    (call under creation_lock, when `database` does not exist)."""
    partial = database.with_name(database.name + ".building")
    partial.unlink(missing_ok=True)  # what a killed build left
    shutil.copyfile(template(), partial)
    MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)  # its Default
    os.replace(partial, database)


def template() -> Path:
    """An empty store at this MLflow's schema, built once per user and schema in
    $XDG_CACHE_HOME/mnist-study (else ~/.cache/mnist-study). Its Default experiment is
    removed: MLflow adds it again on a copy's first open, with the copy's own artifact
    location."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-study"
    path = cache / f"mlflow-store-{latest_schema()}.db"
    if path.exists():
        return path
    with file_lock(cache / "template.lock"):  # creates the folder
        if not path.exists():
            partial = path.with_name(path.name + ".building")
            partial.unlink(missing_ok=True)
            MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
            with sqlite3.connect(partial) as con:
                con.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
                con.execute("DELETE FROM experiments WHERE experiment_id = 0")
            con.close()
            os.replace(partial, path)
    return path


@functools.cache  # MLflow reads every migration script to find it: seconds
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
