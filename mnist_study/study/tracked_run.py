"""One training run, mirrored to an MLflow run: each evaluation point logged, the test set
evaluated on final runs, the model saved, the run ended with its outcome. The one routine
of `mnist-study train` (with or without --mlflow) and of a study's workers, which add
only what Optuna needs through its hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mnist_study.study.outcome import Outcome
from mnist_study.study.tracking import Tracker
from mnist_study.training.config import TrainConfig
from mnist_study.training.dataset import Splits
from mnist_study.training.train import evaluate_test, last_point, train


@dataclass(frozen=True)
class TrackedRun:
    """Where a run's metrics go: an MLflow run of this tracker, or nowhere (`run_id`
    None: `mnist-study train` without --mlflow)."""

    tracker: Tracker | None = None
    run_id: str | None = None
    trial: bool = False  # the run mirrors an Optuna trial (its state becomes a tag)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is not None:
            self.tracker.log_metrics(self.run_id, metrics, step=step)

    def end(self, outcome: Outcome, reason: str = "") -> None:
        if self.run_id is not None:
            self.tracker.end(self.run_id, outcome, reason, trial=self.trial)


def point_line(cfg: TrainConfig, point: int, last: int, m: dict[str, float]) -> str:
    """The console line of one evaluation point."""
    return (
        f"  {cfg.axis} {point}/{last}  train acc {m['train_acc']:.4f} "
        f"loss {m['train_loss']:.4f}"
        f" | val acc {m['val_acc']:.4f} loss {m['val_loss']:.4f} | {m['epoch_seconds']:.1f}s"
    )


def train_tracked(
    cfg: TrainConfig,
    load: Callable[[], Splits],
    run: TrackedRun,
    *,
    test: bool,
    log_model: bool = False,
    on_point: Callable[[int, int, dict[str, float]], None] | None = None,
    before_end: Callable[[Outcome, str, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `cfg` on the data `load` gives (inside the run: a failure or a signal while
    loading ends the run too), log every point, and with `test` evaluate (and log) the test set and
    save the model; returns the last point's metrics (test ones included).

    `on_point(point, last, metrics)` runs after a point is logged and may raise to stop
    the run (Optuna's pruner, a signal). `before_end(outcome, reason, final)` records the
    outcome elsewhere before the run is closed: Optuna's record is written before MLflow's
    mirror, so a crash between them leaves a run the next resume closes, never a run
    closed for a trial left open. Any exception ends the run as what it means
    (outcome.py) and is raised again."""
    last = 0  # the last evaluation point, known once the data is loaded

    def point(p: int, metrics: dict[str, float]) -> None:
        run.log(metrics, step=p)
        if on_point is not None:
            on_point(p, last, metrics)

    try:
        splits = load()
        last = last_point(cfg, len(splits.train_x))
        result = train(cfg, splits, point)
        final = dict(result.history[-1])
        if test:
            metrics = evaluate_test(result.model, splits, cfg)
            run.log(metrics, step=last)
            final |= metrics
            if log_model and run.run_id is not None:
                run.tracker.log_model(run.run_id, result.model)
    except BaseException as exc:  # pruned, diverged, Ctrl-C, a killed parent, a bug
        outcome = Outcome.of(exc)
        if before_end is not None:
            before_end(outcome, outcome.reason(exc), {})
        run.end(outcome, outcome.reason(exc))
        raise
    if before_end is not None:
        before_end(Outcome.COMPLETE, "", final)
    run.end(Outcome.COMPLETE)
    return final
