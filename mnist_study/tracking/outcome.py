"""How a run ends, and what that means in each store: the one mapping the runner and
`mnist-study train --mlflow` share."""

from __future__ import annotations

import enum

import optuna
from optuna.trial import TrialState


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
        from mnist_study.errors import Diverged

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
