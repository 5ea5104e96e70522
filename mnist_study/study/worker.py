"""One worker: claims units of work (a tuning trial, or the final run of one seed) under
a lock, in cell order, and runs them. Each unit is tracked twice: as an Optuna trial (the
record of what is done) and as an MLflow child run (its mirror: curves, tags, model).

Determinism: within a tuning, trials run one after another, each proposed from the
tuning's earlier trials alone (proposals.py), and the pruner compares it with those
alone; a trial redone after a crash proposes the same point. Workers run other tunings
meanwhile. So every proposal and metric follows from the spec, whatever the number of
workers or their timing.
"""

from __future__ import annotations

import enum
import os
import shlex
import statistics
import time
from dataclasses import dataclass

import mlflow
import optuna
from mlflow.entities import Param
from optuna.trial import TrialState

from mnist_study.study import storage as st
from mnist_study.study.files import store_flags
from mnist_study.study.outcome import Outcome
from mnist_study.study.proposals import FixedPoint, distributions, proposal_seed, propose
from mnist_study.study.records import study_names
from mnist_study.study.signals import Interrupted, stop_if_signalled, stopping_on_signals
from mnist_study.study.spec import StudySpec, Tuning, Variant
from mnist_study.study.tracking import Tracker, provenance
from mnist_study.training.dataset import load_splits
from mnist_study.training.train import by_steps, evaluate_test, last_point, resolve_device, train

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


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


@dataclass(frozen=True)
class Unit:
    """One claimed piece of work: a tuning trial, or the final run of one seed."""

    study: optuna.Study
    tuning: Tuning  # its cell (the variant, at one size in a sweep) and which tuning
    role: str  # "tune" or "final"
    trial: optuna.Trial
    slot: int | None = None  # a tuning trial's place in its tuning: 0, 1, ...
    seed: int | None = None

    @property
    def variant(self) -> Variant:
        return self.tuning.cell


class Idle(enum.Enum):
    WAIT = "others still run units that the next one depends on"
    DONE = "nothing left to do"


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
        done += min(
            s.trials, count(optuna.load_study(study_name=tune, storage=storage).trials, DONE)
        )
        finals = optuna.load_study(study_name=final, storage=storage).trials
        done += len({t.user_attrs.get("seed") for t in finals if t.state in DONE} & set(s.seeds))
    return done, len(spec.tunings) * (s.trials + len(s.seeds))


class Worker:
    def __init__(
        self,
        spec: StudySpec,
        opts: RunOptions,
        experiment_id: str,
        index: int,
        parent_pid: int | None = None,
    ):
        self.spec, self.opts, self.index, self.parent_pid = spec, opts, index, parent_pid
        mlflow.set_tracking_uri(opts.tracking_uri)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.tracker = Tracker(opts.tracking_uri, experiment_id)
        self.storage = st.open_storage(opts.storage)
        self.journal = st.journal_identity(opts.storage)
        pruner = (
            optuna.pruners.MedianPruner(
                n_startup_trials=spec.settings.startup_trials, n_warmup_steps=1
            )
            if spec.settings.pruner == "median"
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
        self.started, self.done_at_start = time.time(), None
        self.waiting_on: list[str] = []  # what the last WAIT waits on, from other hosts
        self.said_waiting = 0.0

    # --- claiming work -----------------------------------------------------------
    def claim(self) -> Unit | Idle:
        """The next unit, claimed as an Optuna trial of this process; or WAIT, or DONE.
        Call under claim_lock, after reaping dead workers' trials."""
        waiting, self.waiting_on = False, []
        for tuning in self.spec.tunings:
            study = self.tune[tuning.key]
            tune = study.get_trials(deepcopy=False)
            done = [t for t in tune if t.state in DONE]
            running = [t for t in tune if t.state == TrialState.RUNNING]
            if running:  # trials of a tuning run one at a time
                waiting = True
                lines = (st.waiting_line(study.study_name, t) for t in running)
                self.waiting_on += [line for line in lines if line]
                continue
            if len(done) < self.spec.settings.trials:
                return self.claim_trial(tuning, done)
            finals = self.final[tuning.key].get_trials(deepcopy=False)
            taken = {t.user_attrs.get("seed") for t in finals if t.state in TAKEN}
            free = [s for s in self.spec.settings.seeds if s not in taken]
            if free and best_trial(study) is not None:
                trial = st.claim_trial(self.final[tuning.key], {"worker": self.index})
                trial.set_user_attr("seed", free[0])
                return Unit(self.final[tuning.key], tuning, "final", trial, seed=free[0])
            if count(finals, (TrialState.RUNNING,)):
                waiting = True
        return Idle.WAIT if waiting else Idle.DONE

    def claim_trial(self, tuning: Tuning, done: list) -> Unit:
        study, slot = self.tune[tuning.key], len(done)
        params = propose(tuning, done, self.spec.settings.startup_trials)
        study.sampler = FixedPoint(params)
        trial = st.claim_trial(
            study,
            {"sampler_seed": tuning.sampler_seed, "worker": self.index},
            distributions(tuning.cell),
        )
        trial.set_user_attr("slot", slot)
        return Unit(study, tuning, "tune", trial, slot=slot)

    def next_unit(self) -> Unit | Idle:
        with st.claim_lock(self.opts.storage):
            st.check_same_journal(self.opts.storage, self.journal)
            studies = [s for k in self.tune for s in (self.tune[k], self.final[k])]
            reap_studies(studies, self.tracker)
            for v in self.spec.cells:
                if v.key not in self.finished and self.cell_done(v):
                    self.finish_cell(v)
                    self.finished.add(v.key)
            unit = self.claim()
            if isinstance(unit, Unit) and unit.variant.key not in self.parents:
                # Under the lock, or two processes may both create a variant's parent run.
                cfg = self.spec.config_for(unit.variant, {})
                source = provenance(
                    cfg, str(resolve_device(cfg)), self.opts.command(self.spec.path)
                )
                self.parents[unit.variant.key] = self.tracker.parent_run(
                    unit.variant, cfg, {k: v for k, v in source.items() if k.startswith("mlflow.")}
                )
            return unit

    def loop(self) -> None:
        with stopping_on_signals():
            while True:
                stop_if_signalled()
                unit = self.next_unit()
                if unit is Idle.DONE:
                    break
                if unit is Idle.WAIT:  # others run the trial the next unit depends on
                    if self.waiting_on and time.time() - self.said_waiting > 60:
                        for line in self.waiting_on:
                            self.say(f"worker {self.index}: {line}", force=True)
                        self.said_waiting = time.time()
                    time.sleep(1)
                    continue
                self.run_unit(unit)
        self.say(f"worker {self.index}: nothing left to do", force=True)

    # --- running a unit ----------------------------------------------------------
    def run_unit(self, unit: Unit) -> None:
        try:
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
        self.say(f"{self.progress()} {name}: {shown}", force=True)
        self.train_unit(unit, cfg, run_id)

    def open_run(self, unit: Unit) -> tuple[str, dict, object, str]:
        """The unit's point, config and MLflow run, tagged with its Optuna trial (which
        is how the reaper finds the run if the worker dies before recording its id):
        (name, params, config, run id)."""
        study, variant, trial, tuning = unit.study, unit.variant, unit.trial, unit.tuning
        extra = {"tuning": tuning.index, "sampler_seed": tuning.sampler_seed}
        if unit.role == "tune":
            params = dict(trial.params)
            name = f"{tuning.key}/trial-{unit.slot}"
            extra |= {"slot": unit.slot, "proposal_seed": proposal_seed(tuning, unit.slot)}
        else:
            best = best_trial(self.tune[tuning.key])
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
            self.parents[variant.key],
            name,
            cfg,
            {k: str(v) for k, v in tags.items()},
            test=unit.role == "final",
        )
        return name, params, cfg, run_id

    def train_unit(self, unit: Unit, cfg, run_id: str) -> None:
        study, trial = unit.study, unit.trial
        unit_name = "step" if by_steps(cfg) else "epoch"
        last = 0  # the last evaluation point, known once the data is loaded

        def on_epoch(point: int, m: dict[str, float]) -> None:
            self.tracker.log_metrics(run_id, m, step=point)
            st.mark_alive(study, trial)
            self.say(
                f"    {unit_name} {point}/{last}  train acc {m['train_acc']:.4f} "
                f"loss {m['train_loss']:.4f} | val acc {m['val_acc']:.4f} "
                f"loss {m['val_loss']:.4f} | {m['epoch_seconds']:.1f}s"
            )
            stop_if_signalled()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                raise Interrupted("parent process died")
            if unit.role == "tune":
                trial.report(m["val_acc"], point)
                # At the last point the work is done: keep it as a complete trial.
                if point < last and trial.should_prune():
                    raise optuna.TrialPruned(f"median pruner at {unit_name} {point}")

        try:
            splits = load_splits(self.opts.data_root, cfg)
            last = last_point(cfg, len(splits.train_x))
            result = train(cfg, splits, on_epoch)
            if unit.role == "final":
                test = evaluate_test(result.model, splits, cfg)
                self.tracker.log_metrics(run_id, test, step=last)
                trial.set_user_attr("test_acc", test["test_acc"])
                if self.opts.log_models:
                    self.tracker.log_model(run_id, result.model)
                self.say(f"    test acc {test['test_acc']:.4f}", force=True)
        except BaseException as exc:  # pruned, diverged, Ctrl-C, a killed parent, a bug
            outcome = Outcome.of(exc)
            reason = outcome.reason(exc)
            key = "prune_reason" if outcome.trial_state == TrialState.PRUNED else "fail_reason"
            trial.set_user_attr(key, reason)
            study.tell(trial, state=outcome.trial_state)
            self.tracker.end(run_id, outcome, reason)
            if outcome.trial_state == TrialState.PRUNED:
                self.say(f"    pruned: {reason}", force=True)
                return
            raise
        study.tell(trial, result.history[-1]["val_acc"])
        self.tracker.end(run_id, Outcome.COMPLETE)

    def cell_done(self, cell: Variant) -> bool:
        s = self.spec.settings
        for tuning in self.spec.tunings:
            if tuning.cell.key != cell.key:
                continue
            tune = self.tune[tuning.key].get_trials(deepcopy=False)
            finals = self.final[tuning.key].get_trials(deepcopy=False)
            seeds = {t.user_attrs.get("seed") for t in finals if t.state == TrialState.COMPLETE}
            no_best = best_trial(self.tune[tuning.key]) is None
            if count(tune, DONE) < s.trials or not (no_best or seeds >= set(s.seeds)):
                return False
        return True

    def finish_cell(self, cell: Variant) -> None:
        """Record the cell's outcome on its parent run, once: per tuning its best trial
        and point (prefixed t0., t1., ... when the cell is tuned several times)."""
        parent = self.tracker.parent_run(cell)
        if self.tracker.client.get_run(parent).info.status == "FINISHED":
            return
        tags, params, accs, best_vals = {}, [], [], []
        for tuning in (t for t in self.spec.tunings if t.cell.key == cell.key):
            best = best_trial(self.tune[tuning.key])
            finals = [
                t
                for t in self.final[tuning.key].get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE
            ]
            accs += [t.user_attrs["test_acc"] for t in finals]
            prefix = f"t{tuning.index}." if tuning.replicated else ""
            tags[f"{prefix}best_trial"] = (
                best.user_attrs.get("slot", best.number) if best else "none (no trial completed)"
            )
            tags[f"{prefix}final_seeds"] = ",".join(str(t.user_attrs["seed"]) for t in finals)
            if best is not None:
                best_vals.append(best.value)
                params += [Param(f"{prefix}best_{k}", str(v)) for k, v in best.params.items()]
        self.tracker.set_tags(parent, tags)
        if params:
            self.tracker.client.log_batch(parent, params=params)
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
        self.say(f"{cell.key}: done; test acc {fmt_accs(accs)}", force=True)

    # --- progress ----------------------------------------------------------------
    def progress(self) -> str:
        done, total = progress_counts(self.spec, self.storage)
        if self.done_at_start is None:
            self.done_at_start = done
        elapsed = time.time() - self.started
        left = ""
        if done > self.done_at_start:
            rate = elapsed / (done - self.done_at_start)
            left = f", ~{minutes(rate * (total - done))} left"
        return f"[w{self.index} {done}/{total} done | {minutes(elapsed)}{left}]"

    def say(self, text: str, force: bool = False) -> None:
        """A line of output; with several workers, tagged with this one's number."""
        if self.opts.workers > 1 and not text.startswith(("[w", "worker ")):
            text = f"[w{self.index}] {text}"
        if force or not self.opts.quiet:
            print(text, flush=True)


def count(trials, states) -> int:
    return sum(t.state in states for t in trials)


def best_trial(study: optuna.Study):
    """The best complete trial; a tie goes to the earlier slot (trial numbers also count
    failed trials, which depend on crashes)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    key = lambda t: (t.value, -t.user_attrs.get("slot", t.number))  # noqa: E731
    return max(complete, key=key) if complete else None


def minutes(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def fmt_accs(accs: list[float]) -> str:
    if not accs:
        return "no final run completed"
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.4f} ± {sd:.4f} (n={len(accs)})"
