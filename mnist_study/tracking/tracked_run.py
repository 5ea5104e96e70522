"""`mnist-study train`'s run: a line per evaluation point, mirrored to an MLflow run when
one is given (`--mlflow`), the test set evaluated with `--test`, the run ended with its
outcome. A study's units live the same life (training.train.fit) with Optuna's hooks."""

from __future__ import annotations

from dataclasses import dataclass

from mnist_study.tracking.outcome import Outcome
from mnist_study.tracking.runs import Tracker
from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import Splits
from mnist_study.training.train import fit, point_line


@dataclass(frozen=True)
class TrackedRun:
    """Where a run's metrics go: an MLflow run of this tracker, or nowhere (`run_id`
    None: `mnist-study train` without --mlflow)."""

    tracker: Tracker | None = None
    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is not None:
            self.tracker.log_metrics(self.run_id, metrics, step=step)

    def end(self, outcome: Outcome, reason: str = "") -> None:
        if self.run_id is not None:
            self.tracker.end(self.run_id, outcome, reason, trial=False)


def train_tracked(cfg: TrainConfig, splits: Splits, run: TrackedRun, test: bool) -> dict:
    """Train `cfg`, print and log every point, and with `test` evaluate (and log) the
    test set; returns the last point's metrics (test ones included). Any exception ends
    the run as what it means (outcome.py) and is raised again."""

    def on_point(point: int, last: int, metrics: dict[str, float]) -> None:
        run.log(metrics, step=point)
        print(point_line(cfg, point, last, metrics), flush=True)

    try:
        training = fit(cfg, splits, on_point, test)
        if test:
            run.log(training.test, step=training.last)
    except BaseException as exc:  # diverged, Ctrl-C, a bug
        outcome = Outcome.of(exc)
        run.end(outcome, outcome.reason(exc))
        raise
    run.end(Outcome.COMPLETE)
    return training.result
