"""How long the unit in progress and the whole study have left: each unit's known work
(optimizer steps x batch, its evaluation passes, a final seed's test set) priced at the
seconds per image measured so far. Not an average over finished units, which is wrong
until many have finished (a study's units differ by a factor of ten: pruned trials,
deeper nets, larger training sets) and says nothing before the first one ends.

Every unit's measurements go on its trial (system attribute `pace`, with its heartbeat),
so each worker prices the study from what all workers, on every host, have measured:
per variant (a deeper net costs more per image), and a variant not yet run from what it
will compute: its net's training step timed here (model.step_seconds) against those of
the variants measured, not at their mean (which priced the deeper net at a third).
Trials not yet run past the pruner's startup are priced at the share of their steps
that such trials ran so far, and before any has ended at the median pruner's prior:
half stopped at their first point."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from mnist_study.study.console import minutes
from mnist_study.study.ledger import Ledger
from mnist_study.study.optuna_storage import trial_id
from mnist_study.training.config import TrainConfig
from mnist_study.training.model import step_seconds
from mnist_study.training.train import evaluation_points

PACE = "pace"  # the trial's system attribute: its measurements so far


@dataclass(frozen=True)
class Work:
    """What one unit computes, known before it starts."""

    points: tuple[int, ...]  # the optimizer steps at which it is evaluated
    batch: int
    per_eval: int  # images one evaluation passes over (training subset + validation)
    test: int  # images of the test set: a final seed's, else 0

    @classmethod
    def of(cls, cfg: TrainConfig, final: bool) -> Work:
        return cls(
            tuple(evaluation_points(cfg, cfg.train_size)),
            cfg.batch_size,
            min(cfg.train_eval_size, cfg.train_size) + cfg.val_size,
            cfg.test_size if final else 0,
        )

    def images_left(self, reached: int) -> tuple[int, int]:
        """(images to train on, images to evaluate) after `reached` evaluation points."""
        trained = self.points[reached - 1] if reached else 0
        evals = (len(self.points) - reached) * self.per_eval + self.test
        return (self.points[-1] - trained) * self.batch, evals

    def seconds_left(self, reached: int, cost: Cost) -> float:
        train, evals = self.images_left(reached)
        return train * cost.train + evals * cost.eval


@dataclass(frozen=True)
class Cost:
    """Seconds per image: training (forward, backward, step) and evaluation (forward)."""

    train: float
    eval: float


class UnitPace:
    """The running unit's measurements: the time of each evaluation point is split into
    training (the run's own clock) and the rest (its evaluations and their logging)."""

    def __init__(self, work: Work):
        self.work, self.reached = work, 0
        self.since = time.perf_counter()
        self.sums = {"train_s": 0.0, "train_images": 0, "eval_s": 0.0, "eval_images": 0}

    def point(self, train_seconds: float) -> dict[str, float]:
        """Record an evaluation point just passed (`train_seconds` of it training); the
        record that goes on the trial."""
        now = time.perf_counter()
        before = self.work.points[self.reached - 1] if self.reached else 0
        self.sums["train_s"] += train_seconds
        self.sums["train_images"] += (self.work.points[self.reached] - before) * self.work.batch
        self.sums["eval_s"] += max(0.0, now - self.since - train_seconds)
        self.sums["eval_images"] += self.work.per_eval
        self.reached += 1
        self.since = now
        return {"reached": self.reached, **self.sums}

    def seconds_left(self) -> float:
        return self.work.seconds_left(self.reached, cost_of([self.sums]))


def cost_of(records: list[dict]) -> Cost | None:
    """The pooled seconds per image of some measurements; None with none to go on."""
    train_images = sum(r["train_images"] for r in records)
    eval_images = sum(r["eval_images"] for r in records)
    if not train_images or not eval_images:
        return None
    return Cost(
        sum(r["train_s"] for r in records) / train_images,
        sum(r["eval_s"] for r in records) / eval_images,
    )


def image_seconds(cfg: TrainConfig) -> float:
    """A training image's seconds in this cell's net, as timed here (no data, no
    evaluation): the unit by which variants' measured costs are compared."""
    net = (cfg.convs_per_block, cfg.batchnorm, cfg.dropout > 0, cfg.batch_size)
    return step_seconds(*net) / cfg.batch_size


def cost_per_work(measured: dict[str, list[dict]], work: dict[str, float]) -> Cost | None:
    """Seconds per image and unit of `work` (a variant's image_seconds), pooled over the
    measured variants: a variant not yet measured costs this times its work."""
    return cost_of(
        [
            r
            | {
                "train_images": r["train_images"] * work[name],
                "eval_images": r["eval_images"] * work[name],
            }
            for name, records in measured.items()
            for r in records
        ]
    )


def cell_costs(measured: dict[str, list[dict]], cfgs: dict[str, TrainConfig]) -> dict | None:
    """Each cell's Cost: its own measurements, or (none yet) its net's timed step priced
    at the seconds per unit of that time the measured cells took; None with nothing
    measured."""
    if not measured:
        return None
    costs = {name: cost_of(measured.get(name, [])) for name in cfgs}
    if all(costs.values()):
        return costs
    work = {name: image_seconds(cfg) for name, cfg in cfgs.items()}
    per_work = cost_per_work(measured, work)
    if per_work is None:
        return None
    return {
        name: cost or Cost(per_work.train * work[name], per_work.eval * work[name])
        for name, cost in costs.items()
    }


def study_seconds_left(
    ledger: Ledger, workers: int, own: tuple[int, float] | None = None
) -> float | None:
    """Seconds until the study is done, with `workers` working on it (more if more units
    are running); `own`: (trial id, seconds left) of this worker's unit, which it knows
    best. None until some unit has measured its pace."""
    spec = ledger.spec
    measured: dict[str, list[dict]] = {}
    cfgs: dict[str, TrainConfig] = {}
    begun_units: list[tuple[str, Work, int]] = []  # (variant, work, points reached)
    seeds_left: list[tuple[str, Work]] = []  # (variant, work) of units not begun
    trials_left: list[tuple[str, Work, bool]] = []  # ..., and whether the pruner may stop it
    shares: list[float] = []  # finished trials the pruner could stop: the share they ran
    running, own_left = 0, 0.0
    startup = spec.settings.startup_trials if spec.settings.pruner == "median" else math.inf
    for state in ledger.tunings.values():
        name, cfg = state.tuning.cell.name, spec.config_for(state.tuning.cell, {})
        cfgs[name] = cfg
        tune, final = Work.of(cfg, False), Work.of(cfg, True)
        for t in state.trials + state.finals:
            if PACE in t.system_attrs:
                measured.setdefault(name, []).append(t.system_attrs[PACE])
        for work, t in [(tune, t) for t in state.running_trials] + [
            (final, t) for t in state.running_finals
        ]:
            running += 1
            if own and trial_id(t) == own[0]:
                own_left = own[1]
            else:
                begun_units.append((name, work, reached(t, work)))
        for t in state.done_trials:
            if t.user_attrs.get("slot", t.number) >= startup:
                k = reached(t, tune)
                shares.append(tune.points[k - 1] / tune.points[-1] if k else 0.0)
        trials, seeds = state.units_left
        started = len(state.done_trials) + len(state.running_trials)
        unpruned = max(0, min(trials, startup - started))  # still in the pruner's startup
        trials_left += [(name, tune, False)] * unpruned + [(name, tune, True)] * (trials - unpruned)
        seeds_left.extend([(name, final)] * seeds)
    costs = cell_costs(measured, cfgs)
    if costs is None:
        return None

    def share(work: Work, prunable: bool) -> float:
        if not prunable:
            return 1.0
        if shares:
            return sum(shares) / len(shares)
        return 0.5 + 0.5 * work.points[0] / work.points[-1]  # the median pruner's prior

    begun = [w.seconds_left(k, costs[n]) for n, w, k in begun_units] + [own_left]
    seconds = sum(begun) + sum(w.seconds_left(0, costs[n]) for n, w in seeds_left)
    seconds += sum(share(w, p) * w.seconds_left(0, costs[n]) for n, w, p in trials_left)
    # Shared among the workers, but no sooner than the longest unit already begun.
    return max(seconds / max(workers, running, 1), *begun)


def reached(trial: FrozenTrial, work: Work) -> int:
    """Evaluation points a trial has passed (by what it reported, if it has no pace)."""
    known = trial.system_attrs.get(PACE, {}).get("reached")
    if known is not None:
        return known
    return (
        len(work.points) if trial.state == TrialState.COMPLETE else len(trial.intermediate_values)
    )


def eta(seconds: float | None) -> str:
    """`~1h05m` (or `?` before anything was measured)."""
    return "?" if seconds is None or not math.isfinite(seconds) else f"~{minutes(seconds)}"
