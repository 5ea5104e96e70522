"""One worker process of a study: takes the units its scheduler claims and runs each as a
tracked run (tracked_run.py), adding what Optuna needs: the proposed point, the pruner
at each evaluation, and the trial's outcome told before the run is closed."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from mnist_study.study import storage as st
from mnist_study.study.console import Console
from mnist_study.study.files import store_flags
from mnist_study.study.outcome import Outcome
from mnist_study.study.proposals import proposal_seed
from mnist_study.study.provenance import provenance
from mnist_study.study.scheduler import Idle, Scheduler, Unit, best_trial, progress_counts
from mnist_study.study.signals import (
    Interrupted,
    signals_deferred,
    stop_if_signalled,
    stopping_on_signals,
)
from mnist_study.study.spec import StudySpec, Variant
from mnist_study.study.tracked_run import TrackedRun, point_line, train_tracked
from mnist_study.study.tracking import Role, Tracker
from mnist_study.training.dataset import load_splits
from mnist_study.training.train import resolve_device


@dataclass(frozen=True)
class RunOptions:
    tracking_uri: str
    storage: str
    data_root: str
    workers: int = 1
    threads: int = 0
    """Threads per run (0: the spec's, else 1). Never derived from the worker count:
    runs with other thread counts round differently, and results must not depend on
    how many workers ran them."""
    quiet: bool = False
    log_models: bool = True

    def store_args(self) -> list[str]:
        """The flags that name these stores, where they are not the defaults."""
        return store_flags(self.tracking_uri, self.storage)

    def command(self, spec_path) -> str:
        """The command that runs this study into these stores (a run's source tag)."""
        return shlex.join(
            [
                "mnist-study",
                "run",
                str(spec_path),
                *self.store_args(),
                "--workers",
                str(self.workers),
            ]
            + (["--threads", str(self.threads)] if self.threads else [])
        )


class Worker:
    """Runs the units its scheduler claims until none is left, one at a time."""

    def __init__(
        self,
        spec: StudySpec,
        opts: RunOptions,
        experiment_id: str,
        index: int,
        parent_pid: int | None = None,
    ):
        self.spec, self.opts, self.index, self.parent_pid = spec, opts, index, parent_pid
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tracker = Tracker(opts.tracking_uri, experiment_id)
        self.scheduler = Scheduler(spec, opts.storage, self.tracker, index, self.open_parent)
        self.console = Console(index, opts.workers, opts.quiet)
        self.say = self.console.say

    def loop(self) -> None:
        with stopping_on_signals():
            while True:
                stop_if_signalled()
                unit, finished = self.scheduler.next_unit()
                for line in finished:
                    self.say(line, force=True)
                if unit is Idle.DONE:
                    break
                if unit is Idle.WAIT:  # others run the trial the next unit depends on
                    self.console.waiting(self.scheduler.waiting_on)
                    time.sleep(1)
                    continue
                self.run_unit(unit)
        self.say(f"worker {self.index}: nothing left to do", force=True)

    def open_parent(self, cell: Variant) -> str:
        cfg = self.spec.config_for(cell, {})
        source = provenance(cfg, str(resolve_device(cfg)), self.opts.command(self.spec.path))
        mlflow_tags = {k: v for k, v in source.items() if k.startswith("mlflow.")}
        return self.tracker.parent_run(cell, cfg, mlflow_tags)

    def run_unit(self, unit: Unit) -> None:
        try:
            # A signal between the run's creation and its link would leave a killed run
            # that its FAIL trial does not name: it is raised once both are written.
            with signals_deferred():
                name, params, cfg, run_id = self.open_run(unit)
                st.set_trial_system_attrs(
                    unit.study, st.trial_id(unit.trial), {"mlflow_run_id": run_id}
                )
        except BaseException as exc:  # stopped before the run was linked: record it now
            outcome = Outcome.of(exc)
            unit.trial.set_user_attr("fail_reason", outcome.reason(exc))
            unit.study.tell(unit.trial, state=TrialState.FAIL)
            orphan = self.tracker.trial_run(unit.study.study_name, unit.trial.number)
            if orphan is not None:
                self.tracker.end(orphan, outcome, outcome.reason(exc))
            raise
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
        )
        done = progress_counts(self.spec, self.scheduler.storage)
        self.say(f"{self.console.progress(*done)} {name}: {shown}", force=True)
        self.train_unit(unit, cfg, run_id)

    def open_run(self, unit: Unit) -> tuple[str, dict, object, str]:
        """The unit's point, config and MLflow run, tagged with its Optuna trial (which
        is how the reaper finds the run if the worker dies before recording its id):
        (name, params, config, run id)."""
        study, variant, trial, tuning = unit.study, unit.variant, unit.trial, unit.tuning
        extra = {"tuning": tuning.index, "sampler_seed": tuning.sampler_seed}
        if unit.role == Role.TUNE:
            params = dict(trial.params)
            name = f"{tuning.key}/trial-{unit.slot}"
            extra |= {"slot": unit.slot, "proposal_seed": proposal_seed(tuning, unit.slot)}
        else:
            best = best_trial(self.scheduler.tune[tuning.key])
            params = dict(best.params, seed=unit.seed)
            name = f"{tuning.key}/seed-{unit.seed}"
            extra |= {"seed": unit.seed, "tuned_by_trial": best.user_attrs.get("slot")}
        cfg = self.spec.config_for(variant, params)
        cfg = cfg.replace(threads=self.opts.threads or cfg.threads or 1)
        tags = {
            "variant": variant.name,
            "cell": variant.key,
            "train_size": cfg.train_size,
            "role": unit.role,
            "optuna_study": study.study_name,
            "optuna_trial": trial.number,
            "optuna_state": "RUNNING",
            "workers": self.opts.workers,
            **extra,
            **provenance(cfg, str(resolve_device(cfg)), self.opts.command(self.spec.path)),
        }
        run_id = self.tracker.child_run(
            self.scheduler.parents[variant.key],
            name,
            cfg,
            {k: str(v) for k, v in tags.items()},
            test=unit.role == Role.FINAL,
        )
        return name, params, cfg, run_id

    def train_unit(self, unit: Unit, cfg, run_id: str) -> None:
        """The tracked run, with Optuna's part: the pruner at each point, the trial told
        its outcome (and a final seed's test accuracy) before the run is closed."""
        study, trial = unit.study, unit.trial

        def on_point(point: int, last: int, m: dict[str, float]) -> None:
            st.mark_alive(study, trial)
            self.say("  " + point_line(cfg, point, last, m))
            stop_if_signalled()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                raise Interrupted("parent process died")
            if unit.role == Role.TUNE:
                trial.report(m["val_acc"], point)
                # At the last point the work is done: keep it as a complete trial.
                if point < last and trial.should_prune():
                    raise optuna.TrialPruned(f"median pruner at {cfg.axis} {point}")

        def tell(outcome: Outcome, reason: str, final: dict[str, float]) -> None:
            if outcome is not Outcome.COMPLETE:
                pruned = outcome.trial_state == TrialState.PRUNED
                trial.set_user_attr("prune_reason" if pruned else "fail_reason", reason)
                study.tell(trial, state=outcome.trial_state)
                return
            if unit.role == Role.FINAL:
                trial.set_user_attr("test_acc", final["test_acc"])
            study.tell(trial, final["val_acc"])

        final = unit.role == Role.FINAL
        try:
            result = train_tracked(
                cfg,
                lambda: load_splits(self.opts.data_root, cfg),
                TrackedRun(self.tracker, run_id, trial=True),
                test=final,
                log_model=final and self.opts.log_models,
                on_point=on_point,
                before_end=tell,
            )
        except BaseException as exc:
            if Outcome.of(exc).trial_state != TrialState.PRUNED:
                raise
            self.say(f"    pruned: {Outcome.of(exc).reason(exc)}", force=True)
            return
        if final:
            self.say(f"    test acc {result['test_acc']:.4f}", force=True)
