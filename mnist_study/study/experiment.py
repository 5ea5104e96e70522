"""A study's MLflow store and experiment: the address checked before anything is written
(scheme, folder, an SQLite file's integrity, a server that answers), the store and the
experiment created once, and the spec an existing experiment recorded."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from mnist_study.errors import ConfigError
from mnist_study.study.files import check_writable_folder, file_lock
from mnist_study.study.sqlite_store import build_store, check_store_file, creation_lock, sqlite_file
from mnist_study.study.tracking import EXPERIMENT_KIND, EXTENDED_TAG, SPEC_TAG

# MLflow 3.x's UI opens a bare experiment or run link in its GenAI mode whatever the
# experiment's tags; this query keeps it in Model-training mode (checked in Chromium).
MODEL_TRAINING = "workflowType=machine_learning"


def ui_link(experiment_id: str, page: str = "runs", ui: str = "") -> str:
    """A page of an experiment in MLflow's UI, in Model-training mode: its runs table,
    or `page` (`runs/RUN_ID`, ...); relative (for a description) unless `ui` is given."""
    base = f"{ui.rstrip('/')}/" if ui else ""
    return f"{base}#/experiments/{experiment_id}/{page}?{MODEL_TRAINING}"


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


def prepare_store(
    tracking_uri: str,
    experiment: str,
    description: str = "",
    spec_tag: str = "",
    check_recorded: Callable[[dict[str, str]], str | None] | None = None,
) -> str:
    """Create the database and the experiment once, before any worker starts; an
    existing experiment's recorded spec is first passed to `check_recorded`, which
    raises to refuse it or returns what it accepts as an extension (then recorded).

    Several processes creating a fresh SQLite store at once race on its tables (two
    commands started together): they take turns under a lock beside the database, so
    the spec that one records is the spec the other compares with.
    """
    database = sqlite_file(tracking_uri)
    args = (tracking_uri, experiment, description, spec_tag, check_recorded)
    if database is None:
        return create_experiment(*args)
    with file_lock(creation_lock(database)):
        if not database.exists():
            build_store(database)
        return create_experiment(*args)


def create_experiment(
    tracking_uri: str,
    experiment: str,
    description: str,
    spec_tag: str,
    check_recorded: Callable[[dict[str, str]], str | None] | None = None,
) -> str:
    database = sqlite_file(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        extension = check_recorded(found.tags) if check_recorded is not None else None
        if extension:  # the larger budget is now the study's, and the report says so
            before = found.tags.get(EXTENDED_TAG)
            client.set_experiment_tag(found.experiment_id, SPEC_TAG, spec_tag)
            client.set_experiment_tag(
                found.experiment_id,
                EXTENDED_TAG,
                f"{before}; {extension}" if before else extension,
            )
            if description:
                client.set_experiment_tag(found.experiment_id, "mlflow.note.content", description)
        return found.experiment_id
    location = None  # a tracking server (http) decides where artifacts go
    if database is not None:
        location = ((database.parent / "artifacts").resolve() / experiment).as_uri()
    elif not tracking_uri.startswith(("http://", "https://")):  # a database: local folder
        location = (Path("mlruns/artifacts").resolve() / experiment).as_uri()
    tags = dict(EXPERIMENT_KIND)
    if description:
        tags["mlflow.note.content"] = description
    if spec_tag:
        tags[SPEC_TAG] = spec_tag
    return client.create_experiment(experiment, artifact_location=location, tags=tags)


def find_experiment(tracking_uri: str, experiment: str):
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
