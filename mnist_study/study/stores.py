"""Both records of one study in one object: Optuna's storage says what is done, MLflow
mirrors it (curves, tags, models). Checked once before anything is written, created
(or found on a resume and shown to agree), reconciled, reaped of dead workers' trials;
and each cell's parent run, opened before its first unit (cells.py closes it). What the
record says is done is read through the Ledger.

If one record is lost or replaced, running on would redo the whole study beside the old
runs, and a report would count every seed twice: refused instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from mnist_study.errors import StoresDisagree
from mnist_study.study.ledger import Ledger, TuningLedger
from mnist_study.study.liveness import dead_trials, death_reason
from mnist_study.study.optuna_storage import fail_trial, optuna_storage, set_system_attrs
from mnist_study.study.record import Resume, StudyRecord
from mnist_study.study.spec import Cell, StudySpec, Tuning
from mnist_study.tracking.names import VIEW_TAG, cells_view
from mnist_study.tracking.outcome import Outcome
from mnist_study.tracking.runs import Tracker, unit_runs
from mnist_study.tracking.store import (
    check_artifact_folder,
    check_tracking_uri,
    experiment_store,
    find_experiment,
    follow_artifact_place,
)

OBJECTIVE = "validation accuracy at the last evaluation"


def study_names(spec: StudySpec, tuning: Tuning) -> tuple[str, str]:
    """A tuning's Optuna studies: its trials, and its final seeds."""
    tune = f"{spec.name}.{tuning.cell.key}" + (f".t{tuning.index}" if tuning.replicated else "")
    return tune, f"{tune}.final"


@dataclass
class OptunaSide:
    trials: int
    """Trials of this spec's studies, in any state."""
    run_ids: dict[str, str]
    """MLflow run id -> 'study#trial' for every trial that has one."""
    states: dict[str, str] = field(default_factory=dict)
    """MLflow run id -> the state of its trial (COMPLETE, PRUNED, FAIL, RUNNING)."""
    runless: list[str] = field(default_factory=list)
    """'study#trial' of FAIL trials with no run: their worker died between claiming the
    trial and creating its run."""


def optuna_side(storage: optuna.storages.BaseStorage, spec: StudySpec) -> OptunaSide:
    existing = set(optuna.get_all_study_names(storage))
    side = OptunaSide(0, {})
    for name in (n for t in spec.tunings for n in study_names(spec, t) if n in existing):
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            side.trials += 1
            if "mlflow_run_id" in t.system_attrs:
                side.run_ids[t.system_attrs["mlflow_run_id"]] = f"{name}#{t.number}"
                side.states[t.system_attrs["mlflow_run_id"]] = t.state.name
            elif t.state == TrialState.FAIL:
                side.runless.append(f"{name}#{t.number}")
    return side


def open_runs_of_ended_trials(side: OptunaSide, runs: dict[str, str]) -> list[str]:
    """Run ids RUNNING in MLflow whose trial has ended (its worker wrote the trial's end
    but not the run's: a full disk, a deleted experiment, a kill in between)."""
    return [
        r
        for r, status in runs.items()
        if status == "RUNNING" and side.states.get(r, "RUNNING") != "RUNNING"
    ]


class StudyStores:
    """A study's Optuna storage and MLflow experiment, as one record."""

    def __init__(
        self,
        spec: StudySpec,
        tracking_uri: str,
        storage_url: str,
        identity: dict[str, str] | None = None,
        allow_mixed: bool = False,
    ):
        self.spec, self.tracking_uri = spec, tracking_uri
        self.record, self.allow_mixed = StudyRecord(spec, identity or {}), allow_mixed
        self.resume = Resume()  # what check() found the stores to hold of this study
        self.optuna = optuna_storage(storage_url)
        self.tracker: Tracker | None = None  # once the experiment exists
        self.tune: dict[str, optuna.Study] = {}  # tuning key -> its trials' study
        self.final: dict[str, optuna.Study] = {}  # tuning key -> its final seeds' study

    def check(self) -> Resume:
        """Refuse bad addresses and a changed spec before either store is written;
        returns what the resume is (an extension, a finished study), if anything."""
        check_tracking_uri(self.tracking_uri)
        self.optuna.check()
        found = find_experiment(self.tracking_uri, self.spec.name)
        self.resume = self.check_resume(found.tags if found else None)
        # A store copied or moved follows itself only once the study is known to resume
        # and to have units left: a refused or finished one is left as it was.
        follows = found is not None and not self.resume.finished_on
        if follows and (followed := follow_artifact_place(self.tracking_uri, found)):
            print(followed)
            found = find_experiment(self.tracking_uri, self.spec.name)
        check_artifact_folder(self.tracking_uri, self.spec.name, found)
        return self.resume

    def check_resume(self, tags: dict[str, str] | None) -> Resume:
        return self.record.check_resume(
            tags, self.tracking_uri, self.allow_mixed, self.finished_on_record
        )

    def finished_on_record(self) -> bool:
        """Whether Optuna's record holds every unit of this spec (read only)."""
        if not self.optuna.exists():
            return False
        storage = self.optuna.open()
        names = {n for t in self.spec.tunings for n in study_names(self.spec, t)}
        if not names <= set(optuna.get_all_study_names(storage)):
            return False
        done, total = Ledger.read(self.spec, *self.load_studies(storage)).progress()
        return done == total

    def load_studies(self, storage, pruner=None, created_only=False) -> tuple[dict, dict]:
        """Every tuning's two Optuna studies (its trials, with `pruner`; its final seeds),
        by tuning key; `created_only`: those that exist, for a reader of an extended spec
        that `run` has not yet extended in the storage."""
        tune, final = {}, {}
        created = set(optuna.get_all_study_names(storage)) if created_only else None
        for tuning in self.spec.tunings:
            trials, seeds = study_names(self.spec, tuning)
            if created is not None and not {trials, seeds} <= created:
                continue
            tune[tuning.key] = optuna.load_study(study_name=trials, storage=storage, pruner=pruner)
            final[tuning.key] = optuna.load_study(study_name=seeds, storage=storage)
        return tune, final

    def create(self) -> str:
        """The MLflow experiment and the tunings' Optuna studies, created once (or found,
        on a resume, after checking that the two records agree); returns the
        experiment's id."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if not self.optuna.exists():  # refuse before creating an empty one
            self.agree(OptunaSide(0, {}), self.mirrored_runs())
        storage = self.optuna.open()
        # Under the claim lock: a second command started at once waits, then sees the
        # first's studies as existing ones (and never races MLflow's table creation).
        with self.optuna.claim_lock():
            side, runs = optuna_side(storage, self.spec), self.mirrored_runs()
            self.agree(side, runs)
            with experiment_store(self.tracking_uri) as store:
                # Compared again where the spec is recorded: two commands started at
                # once with different designs under one name both passed check().
                tags = store.tags(self.spec.name)
                resume = self.check_resume(tags)
                tuned = list(dict.fromkeys(p for t in self.spec.tunings for p in t.tuned_params))
                experiment_id = store.open(
                    self.spec.name,
                    self.record.experiment_tags(tags, resume) | {VIEW_TAG: cells_view(tuned)},
                    self.record.appended(resume),
                )
            self.tracker = Tracker(self.tracking_uri, experiment_id)
            self.reconcile(side, runs)
            for tuning in self.spec.tunings:
                for name, (metric, role) in zip(
                    study_names(self.spec, tuning), study_roles(tuning), strict=True
                ):
                    study = optuna.create_study(
                        storage=storage, study_name=name, direction="maximize", load_if_exists=True
                    )
                    if not study.metric_names:
                        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
                            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                            study.set_metric_names([metric])
                        study.set_user_attr("role", role)
        return experiment_id

    def mirrored_runs(self) -> dict[str, str]:
        """run id -> status of the study's tuning and final runs in MLflow (none yet: {})."""
        found = find_experiment(self.tracking_uri, self.spec.name)
        return unit_runs(self.tracking_uri, found.experiment_id) if found else {}

    def agree(self, side: OptunaSide, runs: dict[str, str]) -> None:
        """Raise StoresDisagree (one line: which store, what to do) unless both records
        (Optuna's `side`, MLflow's `runs`) hold the same study, or neither holds it yet."""
        url, where = self.optuna.url, self.tracking_uri
        name = repr(self.spec.name)
        fresh = f'or set a new name = "..." at the top of {self.spec.path} to start a new study'
        if runs and side.trials == 0:
            raise StoresDisagree(
                f"MLflow ({where}) holds {len(runs)} runs of study {name} but the Optuna "
                f"storage {url} has none of its trials (deleted or replaced?); restore {url} "
                f"to resume, {fresh} (running on would duplicate every run)"
            )
        missing = [r for r in side.run_ids if r not in runs]
        if missing:
            raise StoresDisagree(
                f"the Optuna storage {url} holds {side.trials} trials of study {name} but "
                f"{len(missing)} of their MLflow runs are not in {where} (deleted or "
                f"replaced?); restore the MLflow store to resume, {fresh}"
            )
        unknown = [
            r for r, status in runs.items() if status == "FINISHED" and r not in side.run_ids
        ]
        if unknown:
            raise StoresDisagree(
                f"MLflow ({where}) holds {len(unknown)} finished runs of study {name} that "
                f"match no trial in the Optuna storage {url} (an older or another copy of "
                f"it?); restore the matching storage, {fresh}"
            )

    def reconcile(self, side: OptunaSide, runs: dict[str, str]) -> None:
        """On resume, close every run left RUNNING whose trial has ended, as its trial
        ended. A FAIL trial's run is KILLED; a COMPLETE or PRUNED one's is FINISHED, since
        its metrics were logged before the trial was told (call under the claim lock,
        with both records as agree() saw them)."""
        by_state = {"COMPLETE": Outcome.COMPLETE, "PRUNED": Outcome.PRUNED}
        for run_id in open_runs_of_ended_trials(side, runs):
            outcome = by_state.get(side.states[run_id], Outcome.WORKER_DIED)
            reason = "" if outcome in by_state.values() else "left RUNNING after its trial failed"
            self.tracker.end(run_id, outcome, reason)

    def attach(self, experiment_id: str, created_only: bool = False) -> None:
        """Load the studies create() made (a worker's view of them; `created_only`: a
        reader's, of those there are)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tracker = Tracker(self.tracking_uri, experiment_id)
        storage = self.optuna.open()
        self.journal = self.optuna.identity()
        s = self.spec.settings
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=1)
            if s.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        self.tune, self.final = self.load_studies(storage, pruner, created_only)

    def claim_lock(self):
        """Held while a worker reaps, closes cells and claims the next unit; refuses to
        go on once the journal it opened was deleted or replaced."""
        self.optuna.check_same(self.journal)
        return self.optuna.claim_lock()

    def reap(self) -> None:
        """Mark trials of dead workers FAIL and their MLflow runs KILLED (under the claim
        lock). A worker killed after creating its run but before recording the run's id
        on the trial leaves a run only its tags name: found by them, linked, then closed.
        One killed before creating it leaves a FAIL trial with no run, which the report
        counts."""
        for study in (s for k in self.tune for s in (self.tune[k], self.final[k])):
            for t in dead_trials(study):
                run_id = t.system_attrs.get("mlflow_run_id")
                if run_id is None:
                    run_id = self.tracker.trial_run(study.study_name, t.number)
                    if run_id is not None:
                        set_system_attrs(study, t, {"mlflow_run_id": run_id})
                reason = death_reason(t)
                fail_trial(study, t, reason)
                if run_id is not None:
                    self.tracker.end(run_id, Outcome.WORKER_DIED, reason)

    def ledger(self) -> Ledger:
        """The study's state as Optuna's record holds it now (after attach)."""
        return Ledger.read(self.spec, self.tune, self.final)

    def tuning_ledger(self, tuning: Tuning) -> TuningLedger:
        """One tuning's state alone (two reads, not two per tuning of the study)."""
        return TuningLedger.read(tuning, self.tune[tuning.key], self.final[tuning.key], self.spec)

    def parent_run(self, cell: Cell, command: str) -> str:
        """The cell's parent run, created before its first unit (under the claim lock, or
        two processes may both create it) with the cell's data and source."""
        cfg = self.spec.config_for(cell, {})
        return self.tracker.parent_run(
            cell.key, cell.name, cell.train_size, cell.description, cfg, command
        )


def study_roles(tuning: Tuning) -> tuple[tuple[str, str], tuple[str, str]]:
    """(metric name, role) of a tuning's two Optuna studies, as optuna-dashboard shows
    them: the tuning, and its final seeds (trials only in name: one per seed)."""
    which = f"{tuning.cell.key}, tuning {tuning.index} (sampler seed {tuning.sampler_seed})"
    return (
        (OBJECTIVE, f"tuning of {which}"),
        (
            f"{OBJECTIVE} of a final seed (its test accuracy: user attribute test_acc)",
            f"final seeds of {which}: not a tuning; one trial per seed",
        ),
    )
