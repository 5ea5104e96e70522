"""Optuna storage shared by workers, a lock to claim work, and reaping of dead workers.

Local default: a JournalStorage file (Optuna's documented multi-process storage; SQLite
under several writers fails with "database is locked"). Across machines: PostgreSQL.
Journal storage has no heartbeat, so each trial records its worker (host, pid) and a
heartbeat time, and a trial whose worker is gone is marked FAIL before work is claimed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from mnist_study.config import ConfigError

# A worker on another host is presumed dead when its trial's heartbeat is this old.
STALE_AFTER_S = 900


def is_remote(url: str) -> bool:
    return "://" in url


def check_storage_url(url: str) -> None:
    if is_remote(url) and not url.startswith(("postgresql", "sqlite:///")):
        raise ConfigError(
            f"--storage {url}: must be a journal file path, sqlite:///PATH "
            f"(one machine) or postgresql://USER@HOST/DB (several)"
        )


def local_path(url: str) -> str:
    """The file a local storage lives in (its lock file sits beside it)."""
    return url.removeprefix("sqlite:///")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """'postgresql://...' or 'sqlite:///...' -> RDBStorage; a plain path -> journal file."""
    check_storage_url(url)
    if is_remote(url):
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


@contextlib.contextmanager
def claim_lock(url: str) -> Iterator[None]:
    """Held while a worker counts a study's trials and claims the next slot.

    Without it two workers can both see 7 of 8 trials and both start the 8th.
    Local: an flock beside the journal. PostgreSQL: a session advisory lock.
    """
    if url.startswith("postgresql"):
        import sqlalchemy

        key = int(hashlib.sha256(url.encode()).hexdigest()[:15], 16)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    # Not "<journal>.lock": JournalFileBackend uses that name for its own lock.
    with open(local_path(url) + ".claim.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def worker_id() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def mark_alive(study: optuna.Study, trial_id: int) -> None:
    study._storage.set_trial_system_attr(trial_id, "heartbeat", time.time())


def worker_is_dead(trial: FrozenTrial) -> bool:
    host, pid = trial.system_attrs.get("host"), trial.system_attrs.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    heartbeat = trial.system_attrs.get("heartbeat", trial.datetime_start.timestamp())
    return time.time() - heartbeat > STALE_AFTER_S


def reap_dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Mark RUNNING trials of dead workers FAIL; return them (call under claim_lock)."""
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_is_dead(trial):
            storage = study._storage
            reason = (
                f"worker died (pid {trial.system_attrs.get('pid')} on "
                f"{trial.system_attrs.get('host')})"
            )
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            reaped.append(trial)
    return reaped
