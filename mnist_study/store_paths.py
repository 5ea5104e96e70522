"""Where a study's two stores go on one machine by default, the flags that name others,
a check that a store's folder can be written, and the inter-process lock that guards
them. Free of torch, MLflow and Optuna, so that `mnist-study --help` and argument errors
import nothing heavy."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from mnist_study.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_STORAGE = "mlruns/optuna.journal"


# Why a report, which only reads, is refused a read-only store too.
STORE_NEEDS_WRITING = "MLflow and Optuna open a store for writing even to read it, so "


def check_writable_folder(path: Path, what: str, why: str = "") -> None:
    """Refuse a path that exists read-only, or whose folder cannot be made or written,
    writing nothing: the nearest existing folder above it gets a probe file, removed at
    once. `why` is said before the remedy."""
    if path.is_dir():
        raise ConfigError(f"{what} {path}: is a folder; give a file path")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"{what} {path}: cannot write there ({existing}: {exc.strerror}); "
            f"{why}choose a writable place"
        ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(
            f"{what} {path}: cannot write it (read-only for this user); {why}make it "
            f"writable (chmod u+w) or choose another place"
        )


def check_database(url: str, flag: str, timeout_s: int = 5) -> None:
    """Fail in seconds, not minutes, on a database server that does not answer: one
    connection with a timeout (MLflow retries its first one for about two minutes)."""
    import sqlalchemy

    engine = None
    try:
        engine = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": timeout_s}
        )
        with engine.connect():
            pass
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
        raise ConfigError(
            f"{flag} {url}: the database does not answer ({cause}); start it, or check "
            f"the address and the user"
        ) from None
    finally:
        if engine is not None:
            engine.dispose()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (its folder created if needed), released on exit or
    death; not re-entrant across calls (each takes its own descriptor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, preserve_lock_file=True):
        yield


def store_flags(tracking_uri: str, storage: str | None) -> list[str]:
    """The flags that name these stores in a printed command, defaults left out."""
    out = []
    if tracking_uri != DEFAULT_TRACKING_URI:
        out += ["--tracking-uri", tracking_uri]
    if storage is not None and storage != DEFAULT_STORAGE:
        out += ["--storage", storage]
    return out
