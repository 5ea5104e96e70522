"""Optuna's storage of a study, behind one interface: a journal file (one machine, the
default) or a database (PostgreSQL for several machines; SQLite for one). Each says
whether it exists, opens (checked and repaired) or connects (as it is), and holds the
claim lock under which workers count trials and claim the next one. Then what a trial's
life needs beyond Optuna's API (system attributes, another process's trial read or
failed). The only module that touches Optuna's private attributes.

The journal is Optuna's documented multi-process storage (SQLite under several writers
fails with "database is locked"). It has no heartbeat: see liveness.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from mnist_study.errors import ConfigError, StorageLost
from mnist_study.store_paths import (
    STORE_NEEDS_WRITING,
    check_database,
    check_writable_folder,
    file_lock,
)
from mnist_study.study.signals import signals_deferred


def optuna_storage(url: str) -> JournalFile | Database:
    """The storage `url` names: a file path (journal), postgresql://... or sqlite:///...;
    anything else is refused in one line."""
    if "://" not in url:
        return JournalFile(url)
    if url.startswith(("postgresql", "sqlite:///")):
        return Database(url)
    raise ConfigError(
        f"--storage {url}: must be a journal file path, sqlite:///PATH "
        f"(one machine) or postgresql://USER@HOST/DB (several)"
    )


class JournalFile:
    """Optuna's journal in a local file; its claim lock is an flock beside it."""

    def __init__(self, url: str):
        self.url, self.path = url, Path(url)

    def check(self) -> None:
        check_writable_folder(self.path, "--storage", STORE_NEEDS_WRITING)

    def exists(self) -> bool:
        return self.path.exists()

    def open(self) -> optuna.storages.BaseStorage:
        """The journal, checked, its folder made and a torn last record (a crash
        mid-write) cut off first: appending after it would glue the next record to it
        and make the whole file unreadable."""
        self.check()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_journal(self.path)
        return self.connect()

    def connect(self) -> optuna.storages.BaseStorage:
        """As it is: no checks, no repair (readers; Optuna ignores a torn last record when
        reading). A missing file would be created: callers that must not write check
        exists() first. By absolute path: Optuna's lock is a symlink to the journal, and
        a relative one points nowhere once stale, so its stale-lock breaking never
        starts (a hang)."""
        return JournalStorage(SignalSafeJournal(str(self.path.resolve())))

    def claim_lock(self) -> contextlib.AbstractContextManager[None]:
        return claim_file_lock(self.path)

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file; None while it is missing."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def check_same(self, opened: tuple[int, int] | None) -> None:
        """Refuse to claim more work once the journal was deleted or replaced: the studies
        this process holds in memory would be written into a file that no longer has them."""
        now = self.identity()
        if opened is not None and now != opened:
            what = "deleted" if now is None else "replaced by another file"
            raise StorageLost(
                f"--storage {self.url}: the Optuna journal was {what} while the study ran; "
                f"stopped without claiming more work (restore it to resume)"
            )


class Database:
    """Optuna's RDBStorage: PostgreSQL (several machines; its claim lock is a session
    advisory lock) or an SQLite file (one machine; an flock beside it)."""

    def __init__(self, url: str):
        self.url = url
        self.file = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite") else None

    def check(self) -> None:
        if self.file is not None:
            check_writable_folder(self.file, "--storage", STORE_NEEDS_WRITING)
        else:
            check_database(self.url, "--storage")

    def exists(self) -> bool:
        return self.file is None or self.file.exists()  # a server is assumed to exist

    def open(self) -> optuna.storages.BaseStorage:
        self.check()
        return self.connect()

    def connect(self) -> optuna.storages.BaseStorage:
        return RDBStorage(self.url, engine_kwargs={"pool_pre_ping": True})

    @contextlib.contextmanager
    def claim_lock(self) -> Iterator[None]:
        if self.file is not None:
            with claim_file_lock(self.file):
                yield
            return
        import sqlalchemy

        key = int(hashlib.sha256(self.url.encode()).hexdigest()[:15], 16)
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()

    def identity(self) -> None:
        return None  # a database replaced under a running study is not detected

    def check_same(self, opened: None) -> None:
        pass


def claim_file_lock(store: Path) -> contextlib.AbstractContextManager[None]:
    """The claim lock of a storage in a local file: an flock beside it (not
    "<journal>.lock", which JournalFileBackend uses for its own lock)."""
    return file_lock(store.with_name(store.name + ".claim.lock"))


class SignalSafeJournal(JournalFileBackend):
    """Optuna's journal file, whose appends a stop signal cannot cut in two."""

    def append_logs(self, logs: list[dict]) -> None:
        with signals_deferred():
            super().append_logs(logs)


def refuse_dangling_lock(path: Path) -> None:
    """A lock left by a process killed while it held it, from a version that opened the
    journal by a relative path: its link points nowhere, and Optuna would wait forever.
    The link is read once: testing it and then its target raced with a live worker
    releasing its lock between the two, and refused a healthy study."""
    lock = path.with_name(path.name + ".lock")
    try:
        target = os.readlink(lock)
    except OSError:  # no lock, or released just now
        return
    if not (lock.parent / target).exists():
        raise ConfigError(
            f"{lock}: a stale lock on the Optuna journal, left by a process killed while it "
            f"held it; check that no study command runs on {path}, remove {lock}, run again"
        )


# Optuna's journal operations (JournalOperation) and the fields each record needs.
RECORD_FIELDS = {
    0: ("study_name", "directions"),
    1: ("study_id",),
    2: ("study_id", "user_attr"),
    3: ("study_id", "system_attr"),
    4: ("study_id",),
    5: ("trial_id", "param_name", "param_value_internal", "distribution"),
    6: ("trial_id", "state"),
    7: ("trial_id", "step", "intermediate_value"),
    8: ("trial_id", "user_attr"),
    9: ("trial_id", "system_attr"),
    10: (),
}


def record_problem(line: bytes) -> str | None:
    """Why a journal line is no Optuna record, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    op = record.get("op_code")
    if type(op) is not int or op not in RECORD_FIELDS:
        return f"op_code {op!r} is no Optuna journal operation"
    missing = [f for f in RECORD_FIELDS[op] if f not in record]
    return f"op_code {op} lacks {', '.join(missing)}" if missing else None


def repair_torn_journal(path: Path) -> Path | None:
    """Under the journal's own lock: if its last record is cut short, keep a backup of the
    file and truncate the partial record; refuse a journal corrupt before its end.
    Returns the backup's path if a repair was made."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    refuse_dangling_lock(path)
    lock = JournalFileSymlinkLock(str(path.resolve()))
    lock.acquire()
    try:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        for number, line in enumerate(data[:end].splitlines(), 1):
            problem = record_problem(line)
            if problem:
                raise ConfigError(
                    f"{path}: record {number} is corrupt ({problem}); restore the file "
                    f"from a backup, or move it away and give the study a new name"
                )
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


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def set_system_attrs(study: optuna.Study, trial: optuna.Trial | FrozenTrial, attrs: dict) -> None:
    """Optuna's public API sets a running trial's user attributes only; a FrozenTrial of
    a dead worker, or the run id on a trial, needs its storage."""
    for key, value in attrs.items():
        study._storage.set_trial_system_attr(trial_id(trial), key, value)


def stored_trial(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as its storage holds it now (another process may have ended it)."""
    return study._storage.get_trial(trial_id(trial))


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """End another process's trial as FAIL with its reason (a user attribute, which
    Optuna's API sets only through the live Trial of the process that asked for it)."""
    study._storage.set_trial_user_attr(trial_id(trial), "fail_reason", reason)
    study._storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
