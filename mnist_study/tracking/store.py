"""A study's MLflow store and experiment: the address checked before anything is written
(scheme, folder, an SQLite file's integrity, a server that answers), the store and the
experiment created once, and the experiments it holds."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow.entities import Experiment
from mlflow.tracking import MlflowClient

from mnist_study.errors import ConfigError
from mnist_study.store_paths import check_writable_folder, file_lock
from mnist_study.tracking.names import EXPERIMENT_KIND, EXTENDED_TAG, NOTE_TAG, SPEC_TAG
from mnist_study.tracking.sqlite_store import (
    build_store,
    check_store_file,
    creation_lock,
    sqlite_file,
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
        if must_exist and not database.is_file():
            raise ConfigError(
                f"--tracking-uri {tracking_uri}: no MLflow store at {database}; "
                f"run a study first or give the right path"
            )
        check_writable_folder(database, "--tracking-uri")
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


def check_server(tracking_uri: str, timeout_s: float = 5) -> None:
    """Fail in seconds, not minutes, on a server that does not answer: one timed request
    to its health endpoint (MLflow's client would retry for minutes)."""
    url = f"{tracking_uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            answer.read()
    except (OSError, ValueError) as exc:  # refused, timed out, not HTTP, an HTTP error
        raise ConfigError(
            f"--tracking-uri {tracking_uri}: the MLflow server does not answer "
            f"({type(exc).__name__}); start it (mlflow server ...) or check the address"
        ) from None


class ExperimentStore:
    """The store while its experiments are looked up and created (see experiment_store)."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def tags(self, experiment: str) -> dict[str, str] | None:
        found = self.client.get_experiment_by_name(experiment)
        return None if found is None else found.tags

    def open(
        self,
        experiment: str,
        description: str = "",
        spec_tag: str = "",
        extension: str | None = None,
    ) -> str:
        """The experiment's id, created with its kind, description and spec tag; an
        existing one that is `extension` of its recorded spec records the larger spec
        (and the extension, which its report says)."""
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            if extension:
                before = found.tags.get(EXTENDED_TAG)
                for key, value in (
                    (SPEC_TAG, spec_tag),
                    (EXTENDED_TAG, f"{before}; {extension}" if before else extension),
                    (NOTE_TAG, description),
                ):
                    if value:
                        self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        database = sqlite_file(self.uri)
        location = None  # a tracking server (http) decides where artifacts go
        if database is not None:
            location = ((database.parent / "artifacts").resolve() / experiment).as_uri()
        elif not self.uri.startswith(("http://", "https://")):  # a database: local folder
            location = (Path("mlruns/artifacts").resolve() / experiment).as_uri()
        tags = dict(EXPERIMENT_KIND)
        if description:
            tags[NOTE_TAG] = description
        if spec_tag:
            tags[SPEC_TAG] = spec_tag
        return self.client.create_experiment(experiment, artifact_location=location, tags=tags)


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


def experiment_tags(tracking_uri: str, experiment: str) -> dict[str, str] | None:
    """The tags of the experiment, if it exists (its recorded spec among them)."""
    found = find_experiment(tracking_uri, experiment)
    return None if found is None else found.tags


def studies(tracking_uri: str) -> list[tuple[str, str]]:
    """(name, id) of every experiment in the store but MLflow's Default."""
    found = MlflowClient(tracking_uri).search_experiments(filter_string="name != 'Default'")
    return [(e.name, e.experiment_id) for e in found]
