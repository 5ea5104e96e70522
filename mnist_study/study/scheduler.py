"""Which unit of a study comes next, claimed under the claim lock as an Optuna trial: in
rounds (claim_order), a tuning's trials one at a time, then its final seeds; and each
cell's parent run, created before its first unit and closed with the cell's outcome after
its last.

Determinism: within a tuning, trials run one after another, each proposed from the
tuning's earlier trials alone (proposals.py), and the pruner compares it with those
alone; a trial redone after a crash proposes the same point. Workers run other tunings
meanwhile. So every proposal and metric follows from the spec, whatever the number of
workers or their timing.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from mnist_study.study import storage as st
from mnist_study.study.outcome import Outcome
from mnist_study.study.proposals import FixedPoint, distributions, propose
from mnist_study.study.records import study_names
from mnist_study.study.spec import StudySpec, Tuning, Variant
from mnist_study.study.tracking import METRIC_NAMES, Role, Tracker

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@dataclass(frozen=True)
class Unit:
    """One claimed piece of work: a tuning trial, or the final run of one seed."""

    study: optuna.Study
    tuning: Tuning  # its cell (the variant, at one size in a sweep) and which tuning
    role: Role  # TUNE or FINAL
    trial: optuna.Trial
    slot: int | None = None  # a tuning trial's place in its tuning: 0, 1, ...
    seed: int | None = None

    @property
    def variant(self) -> Variant:
        return self.tuning.cell


class Idle(enum.Enum):
    WAIT = "others still run units that the next one depends on"
    DONE = "nothing left to do"


class Scheduler:
    """One worker's view of the study's Optuna studies, and what it claims from them."""

    def __init__(
        self,
        spec: StudySpec,
        storage_url: str,
        tracker: Tracker,
        index: int,
        open_parent: Callable[[Variant], str],
    ):
        self.spec, self.url, self.tracker, self.index = spec, storage_url, tracker, index
        self.open_parent = open_parent  # creates a cell's parent run (under the lock)
        self.storage = st.open_storage(storage_url)
        self.journal = st.journal_identity(storage_url)
        s = spec.settings
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=1)
            if s.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        self.tune, self.final = {}, {}
        for tuning in spec.tunings:
            tune, final = study_names(spec, tuning)
            self.tune[tuning.key] = optuna.load_study(
                study_name=tune, storage=self.storage, pruner=pruner
            )
            self.final[tuning.key] = optuna.load_study(study_name=final, storage=self.storage)
        self.finished: set[str] = set()  # cells whose parent run is closed
        self.parents: dict[str, str] = {}  # cell -> its MLflow parent run
        self.waiting_on: list[str] = []  # what the last WAIT waits on, from other hosts

    def next_unit(self) -> tuple[Unit | Idle, list[str]]:
        """The next unit (or WAIT, DONE) and a line for each cell it found finished."""
        finished = []
        with st.claim_lock(self.url):
            st.check_same_journal(self.url, self.journal)
            reap_studies(
                [s for k in self.tune for s in (self.tune[k], self.final[k])], self.tracker
            )
            for cell in self.spec.cells:
                if cell.key not in self.finished and self.cell_done(cell):
                    finished += self.finish_cell(cell)
                    self.finished.add(cell.key)
            unit = self.claim()
            if isinstance(unit, Unit) and unit.variant.key not in self.parents:
                # Under the lock, or two processes may both create a variant's parent run.
                self.parents[unit.variant.key] = self.open_parent(unit.variant)
            return unit, finished

    def claim(self) -> Unit | Idle:
        """The next unit, claimed as an Optuna trial of this process; or WAIT, or DONE."""
        waiting, self.waiting_on = False, []
        for tuning in claim_order(self.spec):
            study = self.tune[tuning.key]
            tune = study.get_trials(deepcopy=False)
            running = [t for t in tune if t.state == TrialState.RUNNING]
            if running:  # trials of a tuning run one at a time
                waiting = True
                lines = (st.waiting_line(study.study_name, t) for t in running)
                self.waiting_on += [line for line in lines if line]
                continue
            done = [t for t in tune if t.state in DONE]
            if len(done) < self.spec.settings.trials:
                return self.claim_trial(tuning, done)
            finals = self.final[tuning.key].get_trials(deepcopy=False)
            taken = {t.user_attrs.get("seed") for t in finals if t.state in TAKEN}
            free = [s for s in self.spec.settings.seeds if s not in taken]
            if free and best_trial(study) is not None:
                trial = st.claim_trial(self.final[tuning.key], {"worker": self.index})
                trial.set_user_attr("seed", free[0])
                return Unit(self.final[tuning.key], tuning, Role.FINAL, trial, seed=free[0])
            if count(finals, (TrialState.RUNNING,)):
                waiting = True
        return Idle.WAIT if waiting else Idle.DONE

    def claim_trial(self, tuning: Tuning, done: list) -> Unit:
        study, slot = self.tune[tuning.key], len(done)
        study.sampler = FixedPoint(propose(tuning, done, self.spec.settings.startup_trials))
        trial = st.claim_trial(
            study,
            {"sampler_seed": tuning.sampler_seed, "worker": self.index},
            distributions(tuning.cell),
        )
        trial.set_user_attr("slot", slot)
        return Unit(study, tuning, Role.TUNE, trial, slot=slot)

    def tunings_of(self, cell: Variant) -> list[Tuning]:
        return [t for t in self.spec.tunings if t.cell.key == cell.key]

    def cell_done(self, cell: Variant) -> bool:
        s = self.spec.settings
        for tuning in self.tunings_of(cell):
            tune = self.tune[tuning.key].get_trials(deepcopy=False)
            finals = self.final[tuning.key].get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,)
            )
            seeds = {t.user_attrs.get("seed") for t in finals}
            no_best = best_trial(self.tune[tuning.key]) is None
            if count(tune, DONE) < s.trials or not (no_best or seeds >= set(s.seeds)):
                return False
        return True

    def finish_cell(self, cell: Variant) -> list[str]:
        """Record the cell's outcome on its parent run, once: per tuning its best trial
        and point (prefixed t0., t1., ... when the cell is tuned several times)."""
        parent = self.tracker.parent_run(cell)
        tags, params, accs, best_vals = {}, {}, [], []
        for tuning in self.tunings_of(cell):
            best = best_trial(self.tune[tuning.key])
            finals = self.final[tuning.key].get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,)
            )
            accs += [t.user_attrs["test_acc"] for t in finals]
            prefix = f"t{tuning.index}." if tuning.replicated else ""
            tags[f"{prefix}best_trial"] = (
                best.user_attrs.get("slot", best.number) if best else "none (no trial completed)"
            )
            tags[f"{prefix}final_seeds"] = ",".join(str(t.user_attrs["seed"]) for t in finals)
            if best is not None:
                best_vals.append(best.value)
                params |= {f"{prefix}best_{k}": v for k, v in best.params.items()}
        closed = self.tracker.client.get_run(parent)
        recorded = closed.data.metrics.get(METRIC_NAMES["n_final"])
        # Closed with as many final runs as now: done. Fewer: the study was extended
        # since, and the cell is closed again with the larger budget's outcome.
        if closed.info.status == "FINISHED" and recorded == (len(accs) or None):
            return []
        self.tracker.set_tags(parent, tags)
        self.tracker.log_params(parent, params)
        if accs:
            self.tracker.log_metrics(
                parent,
                {
                    "test_acc_mean": statistics.mean(accs),
                    "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n_final": len(accs),
                    "best_val_acc": statistics.mean(best_vals),
                },
                step=0,
            )
        self.tracker.finish(parent)
        return [f"{cell.key}: done; test acc {fmt_accs(accs)}"]


def claim_order(spec: StudySpec) -> list[Tuning]:
    """Size by size (in the spec's order), in rounds: every cell's first tuning, then
    every cell's second, ... A study stopped part way then holds whole rounds, each a
    complete smaller study of every variant, and one extended by more tunings adds rounds."""
    size = {n: i for i, n in enumerate(spec.settings.train_sizes)}
    return sorted(spec.tunings, key=lambda t: (size.get(t.cell.train_size, 0), t.index))


def reap_studies(studies: list[optuna.Study], tracker: Tracker) -> None:
    """Mark trials of dead workers FAIL and their MLflow runs KILLED (under claim_lock).

    A worker killed after creating its run but before recording the run's id on the
    trial leaves a run only its tags name: found by them, linked, then closed. One killed
    before creating it leaves a FAIL trial with no run, which the report counts."""
    for study in studies:
        for t in st.dead_trials(study):
            run_id = t.system_attrs.get("mlflow_run_id")
            if run_id is None:
                run_id = tracker.trial_run(study.study_name, t.number)
                if run_id is not None:
                    st.set_trial_system_attrs(study, st.trial_id(t), {"mlflow_run_id": run_id})
            reason = st.death_reason(t)
            st.fail_trial(study, t, reason)
            if run_id is not None:
                tracker.end(run_id, Outcome.WORKER_DIED, reason)


def progress_counts(spec: StudySpec, storage) -> tuple[int, int]:
    """(units done, units in the budget), counted in Optuna's record."""
    s = spec.settings
    done = 0
    for tuning in spec.tunings:
        tune, final = study_names(spec, tuning)
        trials = optuna.load_study(study_name=tune, storage=storage).trials
        done += min(s.trials, count(trials, DONE))
        finals = optuna.load_study(study_name=final, storage=storage).trials
        done += len({t.user_attrs.get("seed") for t in finals if t.state in DONE} & set(s.seeds))
    return done, len(spec.tunings) * (s.trials + len(s.seeds))


def count(trials, states) -> int:
    return sum(t.state in states for t in trials)


def best_trial(study: optuna.Study):
    """The best complete trial; a tie goes to the earlier slot (trial numbers also count
    failed trials, which depend on crashes)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    key = lambda t: (t.value, -t.user_attrs.get("slot", t.number))  # noqa: E731
    return max(complete, key=key) if complete else None


def fmt_accs(accs: list[float]) -> str:
    if not accs:
        return "no final run completed"
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.4f} ± {sd:.4f} (n={len(accs)})"
