"""Optuna storage shared by workers: opening it safely, a lock to claim work, reaping
trials of dead workers. The only module that touches Optuna's private attributes.

Local default: a JournalStorage file (Optuna's documented multi-process storage; SQLite
under several writers fails with "database is locked"). Across machines: PostgreSQL.
Journal storage has no heartbeat, so each trial records its worker (host, pid) and a
heartbeat time, and a trial whose worker is gone is marked FAIL before work is claimed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from mnist_study.errors import ConfigError, StorageLost
from mnist_study.study.files import check_writable_folder, file_lock
from mnist_study.study.signals import signals_deferred

# A worker on another host is presumed dead when its trial's heartbeat is this old.
# Heartbeats come at each evaluation: an epoch of full MNIST on one CPU thread takes
# about 40 s, so 5 minutes leaves room and a dead worker costs minutes, not a quarter
# hour.
STALE_AFTER_S = 300


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
    # By absolute path: Optuna's lock is a symlink to the journal, and a relative one
    # points nowhere once stale, so its stale-lock breaking never starts (a hang).
    return JournalStorage(SignalSafeJournal(str(Path(url).resolve())))


class SignalSafeJournal(JournalFileBackend):
    """Optuna's journal file, whose appends a stop signal cannot cut in two."""

    def append_logs(self, logs: list[dict]) -> None:
        with signals_deferred():
            super().append_logs(logs)


def refuse_dangling_lock(path: Path) -> None:
    """A lock left by a process killed while it held it, from a version that opened the
    journal by a relative path: its link points nowhere, and Optuna would wait forever."""
    lock = path.with_name(path.name + ".lock")
    if lock.is_symlink() and not lock.exists():
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


def last_seen(trial: FrozenTrial) -> float:
    """Seconds since the trial's worker last marked it alive."""
    return time.time() - trial.system_attrs.get("heartbeat", trial.datetime_start.timestamp())


def waiting_line(study_name: str, trial: FrozenTrial) -> str | None:
    """What a worker waiting on another host's trial says, or None for this host's."""
    host, pid = trial.system_attrs.get("host"), trial.system_attrs.get("pid")
    if host == socket.gethostname():
        return None
    return (
        f"waiting on {study_name}#{trial.number}, run by pid {pid} on host {host}, last seen "
        f"{last_seen(trial):.0f} s ago (presumed dead after {STALE_AFTER_S} s without a sign)"
    )


def journal_identity(url: str) -> tuple[int, int] | None:
    """(device, inode) of a journal file; None for servers (and a missing file)."""
    if is_remote(url):
        return None
    try:
        st = os.stat(url)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def check_same_journal(url: str, opened: tuple[int, int] | None) -> None:
    """Refuse to claim more work once the journal was deleted or replaced: the studies
    this process holds in memory would be written into a file that no longer has them."""
    if opened is None:
        return
    now = journal_identity(url)
    if now != opened:
        what = "deleted" if now is None else "replaced by another file"
        raise StorageLost(
            f"--storage {url}: the Optuna journal was {what} while the study ran; stopped "
            f"without claiming more work (restore it to resume)"
        )


def worker_is_dead(trial: FrozenTrial) -> bool:
    host, pid = trial.system_attrs.get("host"), trial.system_attrs.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return process_is_gone(pid)
    return last_seen(trial) > STALE_AFTER_S


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
