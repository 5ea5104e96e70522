"""`mnist-study train`'s run: a line per evaluation point, mirrored to an MLflow run when
one is given (`--mlflow`), the test set evaluated with `--test`, the run ended with its
outcome. A study's units have their own life (study/runner.py), which adds Optuna's."""

from __future__ import annotations

from dataclasses import dataclass

from mnist_study.tracking.outcome import Outcome
from mnist_study.tracking.runs import Tracker
from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import Splits
from mnist_study.training.train import Training, evaluate_test, point_line


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
    training = Training(cfg, splits)
    try:
        for point, metrics in training:
            run.log(metrics, step=point)
            print(point_line(cfg, point, training.last, metrics), flush=True)
        final = dict(training.history[-1])
        if test:
            final |= evaluate_test(training.model, splits, cfg)
            run.log({k: final[k] for k in ("test_loss", "test_acc")}, step=training.last)
    except BaseException as exc:  # diverged, Ctrl-C, a bug
        outcome = Outcome.of(exc)
        run.end(outcome, outcome.reason(exc))
        raise
    run.end(Outcome.COMPLETE)
    return final
