"""A trial's life in Optuna's record beyond what its API offers: claimed as a worker's
(host, pid, heartbeat), kept alive at each evaluation, and failed by any process once its
worker is gone. The only module that touches Optuna's private attributes.

Journal storage has no heartbeat, so each trial records its worker and a heartbeat time,
and a trial whose worker is gone is marked FAIL before work is claimed.
"""

from __future__ import annotations

import socket
import time

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

# A worker on another host is presumed dead when its trial's heartbeat is this old.
# Heartbeats come at each evaluation: an epoch of full MNIST on one CPU thread takes
# about 40 s, so 5 minutes leaves room and a dead worker costs minutes, not a quarter
# hour.
STALE_AFTER_S = 300


def worker_id() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": psutil.Process().pid}


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def set_system_attrs(study: optuna.Study, trial: optuna.Trial | FrozenTrial, attrs: dict) -> None:
    """Optuna's public API sets a running trial's user attributes only; a FrozenTrial of
    a dead worker, or the run id on a trial, needs its storage."""
    for key, value in attrs.items():
        study._storage.set_trial_system_attr(trial_id(trial), key, value)


def claim_trial(
    study: optuna.Study, attrs: dict[str, object], distributions: dict | None = None
) -> optuna.Trial:
    """Ask `study` for a trial (its point drawn from `distributions` by the study's
    sampler), recorded as this process's (host, pid, heartbeat, attrs)."""
    trial = study.ask(distributions)
    set_system_attrs(study, trial, worker_id() | attrs)
    mark_alive(study, trial)
    return trial


def mark_alive(study: optuna.Study, trial: optuna.Trial) -> None:
    set_system_attrs(study, trial, {"heartbeat": time.time()})


def process_is_gone(pid: int) -> bool:
    """No such process, or a zombie (dead, waiting for its parent to collect it)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # alive, another user's
        return False


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


def worker_is_dead(trial: FrozenTrial) -> bool:
    host, pid = trial.system_attrs.get("host"), trial.system_attrs.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return process_is_gone(pid)
    return last_seen(trial) > STALE_AFTER_S


def dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose worker is gone (call under the claim lock, then fail them)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if worker_is_dead(t)
    ]


def death_reason(trial: FrozenTrial) -> str:
    return f"worker died (pid {trial.system_attrs.get('pid')} on {trial.system_attrs.get('host')})"


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """End another process's trial as FAIL with its reason (a user attribute, which
    Optuna's API sets only through the live Trial of the process that asked for it)."""
    study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
