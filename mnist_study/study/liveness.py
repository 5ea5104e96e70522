"""A trial's owner and its signs of life. Optuna's storages have no heartbeat, so each
trial records its worker (host, pid, the process's start time) and a heartbeat at each
evaluation; a trial whose worker is gone is marked FAIL (by any process, under the
claim lock) before work is claimed, and redone. A worker that finds its trial ended by
another process stops it without writing to it again."""

from __future__ import annotations

import os
import socket
import time

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from mnist_study.study.optuna_storage import set_system_attrs, stored_trial, trial_id


def stale_after_s() -> float:
    """How long a trial of another host may go without a sign before it is presumed
    dead: heartbeats come at each evaluation, and an epoch of full MNIST on one CPU
    thread takes about 40 s, so 5 minutes leaves room and a dead worker costs minutes,
    not a quarter hour. MNIST_STUDY_STALE_AFTER_S sets it (slower epochs need more)."""
    return float(os.environ.get("MNIST_STUDY_STALE_AFTER_S", 300))


class TrialTaken(Exception):
    """This worker's trial was ended by another process (presumed dead while it was
    stopped or cut off): nothing more is written to the trial or its run."""


def worker_id() -> dict[str, object]:
    """Who owns a trial: host, pid and the process's start time, so that a pid reused
    by another process (after a reboot, in a fresh PID namespace) is not the owner."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def claim_trial(
    study: optuna.Study, attrs: dict[str, object], distributions: dict | None = None
) -> optuna.Trial:
    """Ask `study` for a trial (its point drawn from `distributions` by the study's
    sampler), recorded as this process's (host, pid, heartbeat, attrs)."""
    trial = study.ask(distributions)
    set_system_attrs(study, trial, worker_id() | attrs)
    mark_alive(study, trial)
    return trial


def mark_alive(study: optuna.Study, trial: optuna.Trial, extra: dict | None = None) -> None:
    """A heartbeat on the trial (with `extra` attributes), once it is seen to be still
    this worker's; raises TrialTaken if another process ended it."""
    frozen = stored_trial(study, trial)
    if frozen.state != TrialState.RUNNING:
        reason = frozen.user_attrs.get("fail_reason", "no reason recorded")
        raise TrialTaken(
            f"{study.study_name}#{trial.number} was ended as {frozen.state.name} by another "
            f"process ({reason})"
        )
    set_system_attrs(study, trial, {"heartbeat": time.time(), **(extra or {})})


def process_is_gone(pid: int, started: float | None = None) -> bool:
    """No such process, a zombie (dead, waiting for its parent to collect it), or
    another process under the same pid (one that started at another time)."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - started) > 0.5:
            return True
        return process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # alive, another user's
        return False


# (study, trial id) -> (its heartbeat, when this process first saw that value).
SEEN: dict[tuple[str, int], tuple[object, float]] = {}


def silent_for(study_name: str, trial: FrozenTrial) -> float:
    """Seconds since this process saw the trial's heartbeat change, on its own monotonic
    clock: only the heartbeat's changes count, never its value, so a host whose clock is
    skewed can neither make a live trial look old nor a dead one young."""
    key, now = (study_name, trial_id(trial)), time.monotonic()
    beat = trial.system_attrs.get("heartbeat")
    seen = SEEN.get(key)
    if seen is None or seen[0] != beat:
        SEEN[key] = (beat, now)
        return 0.0
    return now - seen[1]


def waiting_line(study_name: str, trial: FrozenTrial) -> str | None:
    """What a worker waiting on another host's trial says, or None for this host's."""
    host, pid = trial.system_attrs.get("host"), trial.system_attrs.get("pid")
    if host == socket.gethostname():
        return None
    return (
        f"waiting on {study_name}#{trial.number}, run by pid {pid} on host {host}, no sign "
        f"for {silent_for(study_name, trial):.0f} s (presumed dead after {stale_after_s():.0f} s "
        f"without one)"
    )


def worker_is_dead(study_name: str, trial: FrozenTrial) -> bool:
    host, pid = trial.system_attrs.get("host"), trial.system_attrs.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return process_is_gone(pid, trial.system_attrs.get("started"))
    return silent_for(study_name, trial) > stale_after_s()


def dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose worker is gone (call under the claim lock, then fail them)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if worker_is_dead(study.study_name, t)
    ]


def death_reason(trial: FrozenTrial) -> str:
    return f"worker died (pid {trial.system_attrs.get('pid')} on {trial.system_attrs.get('host')})"
