"""Optuna storage shared by workers: opening it safely, a lock to claim work, reaping
trials of dead workers. The only module that touches Optuna's private attributes.

Local default: a JournalStorage file (Optuna's documented multi-process storage; SQLite
under several writers fails with "database is locked"). Across machines: PostgreSQL.
Journal storage has no heartbeat, so each trial records its worker (host, pid) and a
heartbeat time, and a trial whose worker is gone is marked FAIL before work is claimed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
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


def check_writable_folder(path: Path, what: str) -> None:
    """Refuse a store path whose folder cannot be made or written, writing nothing: the
    nearest existing folder above it gets a probe file, removed at once."""
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
            f"choose a writable place"
        ) from None


def check_storage_location(url: str) -> None:
    check_storage_url(url)
    if not is_remote(url) or url.startswith("sqlite:///"):
        check_writable_folder(Path(local_path(url)), "--storage")


def storage_exists(url: str) -> bool:
    """Whether a local storage file is there (servers are assumed to exist)."""
    return is_remote(url) and not url.startswith("sqlite:///") or Path(local_path(url)).exists()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """'postgresql://...' or 'sqlite:///...' -> RDBStorage; a plain path -> journal file.

    A journal's torn last record (a crash mid-write) is cut off first: appending after it
    would glue the next record to it and make the whole file unreadable.
    """
    check_storage_location(url)
    if not is_remote(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        repair_torn_journal(Path(url))
    return connect(url)


def connect(url: str) -> optuna.storages.BaseStorage:
    """The storage at `url` as it is: no checks, no repair (readers; Optuna ignores a
    torn last record when reading). A missing journal file would be created: callers
    that must not write check storage_exists first."""
    if is_remote(url):
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    return JournalStorage(JournalFileBackend(url))


def repair_torn_journal(path: Path) -> Path | None:
    """Under the journal's own lock: if its last record is cut short, keep a backup of the
    file and truncate the partial record; refuse a journal corrupt before its end.
    Returns the backup's path if a repair was made."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        for number, line in enumerate(data[:end].splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                raise ConfigError(
                    f"{path}: record {number} is corrupt (not JSON); restore the file "
                    f"from a backup, or move it away and give the study a new name"
                ) from None
        if end == len(data):
            return None
        backup = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, backup)
        os.truncate(path, end)
        print(
            f"{path}: its last record was cut short by a crash ({len(data) - end} bytes); "
            f"removed it (Optuna never read it), original kept as {backup}",
            flush=True,
        )
        return backup
    finally:
        lock.release()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed), released on exit or death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    with file_lock(Path(local_path(url) + ".claim.lock")):
        yield


def worker_id() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def set_trial_system_attrs(study: optuna.Study, trial_id_: int, attrs: dict) -> None:
    for key, value in attrs.items():
        study._storage.set_trial_system_attr(trial_id_, key, value)


def claim_trial(
    study: optuna.Study, attrs: dict[str, object], distributions: dict | None = None
) -> optuna.Trial:
    """Ask `study` for a trial (its point drawn from `distributions` by the study's
    sampler), recorded as this process's (host, pid, heartbeat, attrs)."""
    trial = study.ask(distributions)
    set_trial_system_attrs(study, trial_id(trial), worker_id() | attrs)
    mark_alive(study, trial)
    return trial


def mark_alive(study: optuna.Study, trial: optuna.Trial) -> None:
    set_trial_system_attrs(study, trial_id(trial), {"heartbeat": time.time()})


def process_is_gone(pid: int) -> bool:
    """No such process, or a zombie (dead, waiting for its parent to collect it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS): signal 0 is all we can tell
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def worker_is_dead(trial: FrozenTrial) -> bool:
    host, pid = trial.system_attrs.get("host"), trial.system_attrs.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return process_is_gone(pid)
    heartbeat = trial.system_attrs.get("heartbeat", trial.datetime_start.timestamp())
    return time.time() - heartbeat > STALE_AFTER_S


def dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose worker is gone (call under claim_lock, then fail them)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if worker_is_dead(t)
    ]


def death_reason(trial: FrozenTrial) -> str:
    return f"worker died (pid {trial.system_attrs.get('pid')} on {trial.system_attrs.get('host')})"


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
