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
    """Ctrl-C, SIGTERM, or the worker's parent process gone: stop, keep what is done."""


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


_stop_signal = threading.Event()


def on_stop_signal(signum, frame) -> None:
    """Ctrl-C or SIGTERM: raise at once, and remember: Python drops an exception raised
    while a destructor runs, so the worker also checks the flag at every evaluation."""
    _stop_signal.set()
    raise Interrupted(signal.Signals(signum).name)


def stop_if_signalled() -> None:
    if _stop_signal.is_set():
        raise Interrupted("signal")


@contextlib.contextmanager
def stopping_on_signals():
    """Within the block, Ctrl-C and SIGTERM raise Interrupted (in the main thread; other
    threads cannot take signals, and run until the unit ends)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_stop_signal)
    _stop_signal.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
