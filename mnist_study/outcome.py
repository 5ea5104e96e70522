"""How a run ends, and what that means in each store: the one mapping the runner and
`mnist-study train --mlflow` share; and the signals that end one early."""

from __future__ import annotations

import contextlib
import enum
import signal
import threading

import optuna
from optuna.trial import TrialState


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM, SIGHUP, or the worker's parent process gone: stop, keep what is
    done. `signum`: the signal, if one stopped it."""

    def __init__(self, reason: str, signum: int | None = None):
        super().__init__(reason)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the shell's convention; 1 without a signal."""
        return 128 + self.signum if self.signum else 1


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Outcome(enum.Enum):
    # value: (name, Optuna trial state, MLflow run status)
    COMPLETE = ("complete", TrialState.COMPLETE, "FINISHED")
    PRUNED = ("pruned", TrialState.PRUNED, "FINISHED")  # stopped early on purpose
    DIVERGED = ("diverged", TrialState.PRUNED, "FAILED")  # NaN loss: tried, never best
    INTERRUPTED = ("interrupted", TrialState.FAIL, "KILLED")  # redone on resume
    WORKER_DIED = ("worker died", TrialState.FAIL, "KILLED")  # reaped by others; redone
    ERROR = ("error", TrialState.FAIL, "FAILED")  # a bug or a crash; redone on resume

    @property
    def trial_state(self) -> TrialState:
        return self.value[1]

    @property
    def run_status(self) -> str:
        return self.value[2]

    @classmethod
    def of(cls, exc: BaseException) -> Outcome:
        from mnist_study.step import Diverged

        if isinstance(exc, Diverged):
            return cls.DIVERGED
        if isinstance(exc, optuna.TrialPruned):
            return cls.PRUNED
        if isinstance(exc, KeyboardInterrupt):
            return cls.INTERRUPTED
        return cls.ERROR

    def reason(self, exc: BaseException) -> str:
        if self is Outcome.DIVERGED:
            return f"diverged: {exc}"
        if self is Outcome.INTERRUPTED:
            return "interrupted"
        if self is Outcome.PRUNED:
            return str(exc)
        return f"{type(exc).__name__}: {exc}"


_stopped_by: list[int] = []  # the signal that stopped this process, once


def on_stop_signal(signum, frame) -> None:
    """Ctrl-C, SIGTERM or SIGHUP: raise at once, and remember: Python drops an exception
    raised while a destructor runs, so the worker also checks at every evaluation. A
    second signal (Ctrl-C reaches the workers, then their parent passes it on) must not
    interrupt the recording of the first."""
    if _stopped_by:
        return
    _stopped_by.append(signum)
    raise Interrupted(signal.Signals(signum).name, signum)


def stop_if_signalled() -> None:
    if _stopped_by:
        raise Interrupted(signal.Signals(_stopped_by[0]).name, _stopped_by[0])


@contextlib.contextmanager
def stopping_on_signals():
    """Within the block, Ctrl-C, SIGTERM and SIGHUP raise Interrupted (in the main
    thread; other threads cannot take signals, and run until the unit ends)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, on_stop_signal)
    _stopped_by.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
