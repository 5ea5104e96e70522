"""A study's MLflow store and experiment: the address checked before anything is written
(scheme, folder, an SQLite file's integrity, a server that answers), the store and the
experiment created once, and the experiments it holds.

An SQLite store is built whole under another name and renamed into place, so that a kill
while MLflow creates its tables cannot leave it half-built; copied from an empty
template, since MLflow builds a new store by running every migration it ever had
(seconds); and refused in one line when it is half-built or corrupt."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow.entities import Experiment
from mlflow.tracking import MlflowClient

from mnist_study.errors import ConfigError, StoresDisagree
from mnist_study.store_paths import (
    STORE_NEEDS_WRITING,
    check_database,
    check_writable_folder,
    file_lock,
)
from mnist_study.tracking.names import (
    EXPERIMENT_KIND,
    SPEC_TAG,
)

SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "http://", "https://")


def check_tracking_uri(tracking_uri: str, must_exist: bool = False) -> None:
    """Refuse an unsupported scheme, an unwritable folder for a new SQLite store (or, with
    must_exist, a missing one: reading never creates a store), an unreachable server."""
    if not tracking_uri.startswith(SCHEMES):
        raise ConfigError(
            f"--tracking-uri {tracking_uri}: unsupported; use sqlite:///PATH (one machine), "
            f"http://HOST:PORT (an MLflow server) or postgresql://USER@HOST/DB"
        )
    database = sqlite_file(tracking_uri)
    if database is not None:
        special = sorted(set("?#%") & set(str(database)))
        if special:  # SQLAlchemy reads them as the URL's query, fragment or an escape
            raise ConfigError(
                f"--tracking-uri {tracking_uri}: the path holds {' '.join(special)}, which a "
                f"database URL does not read as part of a path (MLflow would write elsewhere); "
                f"use a folder without them"
            )
        if must_exist and not database.is_file():
            raise ConfigError(
                f"--tracking-uri {tracking_uri}: no MLflow store at {database}; "
                f"run a study first or give the right path"
            )
        check_writable_folder(database, "--tracking-uri", STORE_NEEDS_WRITING)
        if database.is_file() and database.stat().st_size:
            with open(database, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise ConfigError(
                        f"--tracking-uri {tracking_uri}: {database} is not an SQLite "
                        f"database; restore the MLflow store or give another path"
                    )
            with file_lock(creation_lock(database)):  # not while another builds it
                check_store_file(tracking_uri, database)
    elif tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri)
    else:
        check_database(tracking_uri, "--tracking-uri")


def check_server(tracking_uri: str, timeout_s: float = 5) -> None:
    """Fail in seconds, not minutes, on a server that does not answer: one timed request
    to its health endpoint (MLflow's client would retry for minutes)."""
    url = f"{tracking_uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            said = answer.read(200)
    except (OSError, ValueError) as exc:  # refused, timed out, not HTTP, an HTTP error
        raise ConfigError(
            f"--tracking-uri {tracking_uri}: the MLflow server does not answer "
            f"({type(exc).__name__}); start it (mlflow server ...) or check the address"
        ) from None
    if said.strip() != b"OK":  # MLflow's own answer; another web server's page is not
        raise ConfigError(
            f"--tracking-uri {tracking_uri}: answers, but not as an MLflow server (its "
            f"/health said {said[:60].decode(errors='replace')!r}); give the MLflow server's "
            f"address"
        )


class ExperimentStore:
    """The store while its experiments are looked up and created (see experiment_store)."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def tags(self, experiment: str) -> dict[str, str] | None:
        found = self.client.get_experiment_by_name(experiment)
        return None if found is None else found.tags

    def open(
        self, experiment: str, tags: dict[str, str] | None = None, appended: dict | None = None
    ) -> str:
        """The experiment's id: created with its kind and `tags`; an existing one gets
        each of `tags` that it holds otherwise, and each of `appended` added to what that
        tag holds ('; ' between entries: the extensions and mixes a study accepted).
        Empty values are not written."""
        tags = {k: v for k, v in (tags or {}).items() if v}
        appended = {k: v for k, v in (appended or {}).items() if v}
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            updates = {k: v for k, v in tags.items() if found.tags.get(k) != v}
            for key, value in appended.items():
                before = found.tags.get(key)
                updates[key] = f"{before}; {value}" if before else value
            for key, value in updates.items():
                self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        location = artifact_place(self.uri, experiment)
        return self.client.create_experiment(
            experiment, artifact_location=location, tags=dict(EXPERIMENT_KIND) | tags
        )


@contextlib.contextmanager
def experiment_store(tracking_uri: str) -> Iterator[ExperimentStore]:
    """The store, built if it is a new SQLite file, held while the caller looks up,
    compares and creates experiments: several processes creating a fresh SQLite store at
    once race on its tables, and two commands started together with one study name must
    not both record their spec. They take turns under a lock beside the database."""
    database = sqlite_file(tracking_uri)
    if database is None:
        yield ExperimentStore(tracking_uri)
        return
    with file_lock(creation_lock(database)):
        if not database.exists():
            build_store(database)
        yield ExperimentStore(tracking_uri)


def artifact_place(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of this store keeps its artifacts: beside a SQLite file,
    so the folder moves with it; a local folder for a database; a tracking server's
    choice (None) behind http."""
    database = sqlite_file(tracking_uri)
    if database is not None:
        return ((database.parent / "artifacts").resolve() / experiment).as_uri()
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return (Path("mlruns/artifacts").resolve() / experiment).as_uri()


def file_path(uri: str) -> Path:
    """The local path of a `file://` artifact place."""
    return Path(urllib.request.url2pathname(uri.removeprefix("file://")))


def follow_artifact_place(tracking_uri: str, found: Experiment) -> str | None:
    """A SQLite store whose experiment keeps its artifacts elsewhere than beside it was
    copied or moved since: written as it is, it would put new models and reports into
    the old folder (two copies then share files) or recreate a moved one. Where its
    artifacts came along, the store follows itself: every recorded place (experiment,
    runs, logged models) is rewritten to the folder beside it, and a line saying so is
    returned; where they did not, refused naming both places. None: nothing to do."""
    database = sqlite_file(tracking_uri)
    expected, recorded = artifact_place(tracking_uri, found.name), found.artifact_location
    if database is None or recorded in (expected, None) or SPEC_TAG not in found.tags:
        return None  # a store of no place to follow, or an experiment that is no study
    folder = file_path(expected)
    if not folder.is_dir():
        raise StoresDisagree(
            f"{database}: study {found.name!r} keeps its artifacts in {recorded}, and "
            f"{folder} beside this database does not exist: the database was copied or "
            f"moved without its artifacts folder; copy that folder beside it, or use the "
            f"store where it was made (--tracking-uri naming the original database)"
        )
    with file_lock(creation_lock(database)), sqlite3.connect(database) as con:
        for table, column in PLACES:
            con.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                f"WHERE substr({column}, 1, ?) = ?",
                (expected, len(recorded) + 1, len(recorded), recorded),
            )
    con.close()
    return (
        f"{database}: the store was copied or moved since study {found.name!r} started; "
        f"its artifacts now follow it ({recorded} -> {expected})"
    )


# Where MLflow's SQLite schema records a place of artifacts.
PLACES = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
)


NAME_BYTES = 255  # a file name's limit on Linux's and macOS's file systems
# The deepest path MLflow writes under a run's artifacts (a logged model's files), with room.
DEEPEST_BELOW = 300


def check_artifact_folder(tracking_uri: str, experiment: str, found: Experiment | None) -> None:
    """Refuse, before anything trains, a local artifact folder the study could not write
    its models into: a component over NAME_BYTES (a long study name is one), a path
    too long for the system, a folder that is a file or not writable."""
    location = (
        found.artifact_location if found is not None else artifact_place(tracking_uri, experiment)
    )
    if not location or not location.startswith("file:"):
        return  # a tracking server's or a cloud store's place: it checks its own
    folder = file_path(location)
    long = next((part for part in folder.parts if len(part.encode()) > NAME_BYTES), None)
    if long is not None:
        raise ConfigError(
            f"study {experiment[:40]!r}...: its artifact folder's name is "
            f"{len(long.encode())} bytes, and file systems allow {NAME_BYTES}; give the "
            f'study a shorter name = "..."'
        )
    if len(str(folder).encode()) + DEEPEST_BELOW > os.pathconf("/", "PC_PATH_MAX"):
        raise ConfigError(
            f"{folder}: too deep for the models the study writes below it "
            f"({len(str(folder))} characters); choose a store nearer the root"
        )
    # A file name MLflow never writes: the check is of the folder, which may exist.
    check_writable_folder(
        folder / ".write-test", "MLflow artifacts in", "the study logs its models there; "
    )


def find_experiment(tracking_uri: str, experiment: str) -> Experiment | None:
    """The experiment, or None; a SQLite store that does not exist yet is not created
    just to look."""
    database = sqlite_file(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if not database.exists():
        return None
    # Opening a store whose tables another command is still creating would run MLflow's
    # migrations a second time, at once ("expected to match one row"): wait for it.
    with file_lock(creation_lock(database)):
        return MlflowClient(tracking_uri).get_experiment_by_name(experiment)


def studies(tracking_uri: str) -> list[tuple[str, str, dict[str, str]]]:
    """(name, id, tags) of every experiment in the store but MLflow's Default, read in
    one query (the tags hold its recorded study and its saved view, if any)."""
    found = MlflowClient(tracking_uri).search_experiments(filter_string="name != 'Default'")
    return [(e.name, e.experiment_id, e.tags) for e in found]


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
