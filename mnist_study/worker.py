"""One worker: claims units of work (a tuning trial, or the final run of one seed) under
a lock, in cell order, and runs them. Each unit is tracked twice: as an Optuna trial (the
record of what is done) and as an MLflow child run (its mirror: curves, tags, model).
"""

from __future__ import annotations

import enum
import os
import statistics
import time
from dataclasses import dataclass

import mlflow
import optuna
from optuna.trial import TrialState

from mnist_study import storage as st
from mnist_study.dataset import load_splits
from mnist_study.outcome import Interrupted, Outcome, stop_if_signalled, stopping_on_signals
from mnist_study.records import study_names
from mnist_study.spec import StudySpec, Variant
from mnist_study.tracking import Tracker, provenance
from mnist_study.train import by_steps, evaluate_test, last_point, resolve_device, train

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@dataclass(frozen=True)
class RunOptions:
    tracking_uri: str
    storage: str
    data_root: str
    workers: int = 1
    threads: int = 0
    """Threads per worker (0: the spec's, or the cores shared out among workers)."""
    quiet: bool = False
    log_models: bool = True


@dataclass(frozen=True)
class Unit:
    """One claimed piece of work: a tuning trial, or the final run of one seed."""

    study: optuna.Study
    variant: Variant  # its cell: the variant, at one size in a sweep
    role: str  # "tune" or "final"
    trial: optuna.Trial
    seed: int | None = None


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
    for v in spec.cells:
        tune, final = study_names(spec, v)
        done += min(
            s.trials, count(optuna.load_study(study_name=tune, storage=storage).trials, DONE)
        )
        finals = optuna.load_study(study_name=final, storage=storage).trials
        done += len({t.user_attrs.get("seed") for t in finals if t.state in DONE} & set(s.seeds))
    return done, len(spec.cells) * (s.trials + len(s.seeds))


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
        names = {v.key: study_names(spec, v) for v in spec.cells}
        self.final = {
            v: optuna.load_study(study_name=final, storage=self.storage)
            for v, (_, final) in names.items()
        }
        # Unique per process across commands and resumes, so that no two processes
        # propose the same points; the first process of a study gets the spec's seed.
        with st.claim_lock(opts.storage):
            self.sampler_seed = spec.settings.sampler_seed + st.take_process_number(
                self.final[spec.cells[0].key]
            )
        self.tune = {
            v: optuna.load_study(
                study_name=tune,
                storage=self.storage,
                sampler=optuna.samplers.TPESampler(
                    seed=self.sampler_seed,
                    n_startup_trials=spec.settings.startup_trials,
                    constant_liar=True,
                ),
                pruner=optuna.pruners.MedianPruner(
                    n_startup_trials=spec.settings.startup_trials, n_warmup_steps=1
                )
                if spec.settings.pruner == "median"
                else optuna.pruners.NopPruner(),
            )
            for v, (tune, _) in names.items()
        }
        self.finished: set[str] = set()  # cells whose parent run is closed
        self.parents: dict[str, str] = {}  # cell -> its MLflow parent run
        self.started, self.done_at_start = time.time(), None

    # --- claiming work -----------------------------------------------------------
    def claim(self) -> Unit | Idle:
        """The next unit, claimed as an Optuna trial of this process; or WAIT, or DONE.
        Call under claim_lock, after reaping dead workers' trials."""
        waiting = False
        for v in self.spec.cells:
            tune = self.tune[v.key].get_trials(deepcopy=False)
            if count(tune, TAKEN) < self.spec.settings.trials:
                trial = st.claim_trial(
                    self.tune[v.key], {"sampler_seed": self.sampler_seed, "worker": self.index}
                )
                return Unit(self.tune[v.key], v, "tune", trial)
            if count(tune, (TrialState.RUNNING,)):
                waiting = True
                continue
            finals = self.final[v.key].get_trials(deepcopy=False)
            taken = {t.user_attrs.get("seed") for t in finals if t.state in TAKEN}
            free = [s for s in self.spec.settings.seeds if s not in taken]
            if free and best_trial(self.tune[v.key]) is not None:
                trial = st.claim_trial(self.final[v.key], {"worker": self.index})
                trial.set_user_attr("seed", free[0])
                return Unit(self.final[v.key], v, "final", trial, free[0])
            if count(finals, (TrialState.RUNNING,)):
                waiting = True
        return Idle.WAIT if waiting else Idle.DONE

    def next_unit(self) -> Unit | Idle:
        with st.claim_lock(self.opts.storage):
            studies = [s for v in self.spec.cells for s in (self.tune[v.key], self.final[v.key])]
            reap_studies(studies, self.tracker)
            for v in self.spec.cells:
                if v.key not in self.finished and self.cell_done(v):
                    self.finish_cell(v)
                    self.finished.add(v.key)
            unit = self.claim()
            if isinstance(unit, Unit) and unit.variant.key not in self.parents:
                # Under the lock, or two processes may both create a variant's parent run.
                self.parents[unit.variant.key] = self.tracker.parent_run(unit.variant)
            return unit

    def loop(self) -> None:
        with stopping_on_signals():
            while True:
                stop_if_signalled()
                unit = self.next_unit()
                if unit is Idle.DONE:
                    break
                if unit is Idle.WAIT:  # others still tune a cell whose finals come next
                    time.sleep(2)
                    continue
                self.run_unit(unit)
        self.say(f"worker {self.index}: nothing left to do", force=True)

    # --- running a unit ----------------------------------------------------------
    def run_unit(self, unit: Unit) -> None:
        study, variant, trial = unit.study, unit.variant, unit.trial
        name, params, cfg, run_id = self.open_run(unit)
        st.set_trial_system_attrs(study, st.trial_id(trial), {"mlflow_run_id": run_id})
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
        )
        self.say(f"{self.progress()} {name}: {shown}", force=True)
        self.train_unit(unit, cfg, run_id)

    def open_run(self, unit: Unit) -> tuple[str, dict, object, str]:
        """The unit's point, config and MLflow run, tagged with its Optuna trial (which
        is how the reaper finds the run if the worker dies before recording its id):
        (name, params, config, run id)."""
        study, variant, trial = unit.study, unit.variant, unit.trial
        if unit.role == "tune":
            params = {k: suggest(trial, k, r) for k, r in variant.search.items()}
            name = f"{variant.key}/trial-{trial.number}"
            extra = {"sampler_seed": self.sampler_seed}
        else:
            best = best_trial(self.tune[variant.key])
            params = dict(best.params, seed=unit.seed)
            name = f"{variant.key}/seed-{unit.seed}"
            extra = {"seed": unit.seed, "tuned_by_trial": best.number}
        cfg = self.spec.config_for(variant, params)
        if self.opts.threads:
            cfg = cfg.replace(threads=self.opts.threads)
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
            **provenance(cfg, str(resolve_device(cfg)), f"mnist-study run {self.spec.path}"),
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

    def cell_done(self, variant: Variant) -> bool:
        s = self.spec.settings
        tune = self.tune[variant.key].get_trials(deepcopy=False)
        finals = self.final[variant.key].get_trials(deepcopy=False)
        seeds = {t.user_attrs.get("seed") for t in finals if t.state == TrialState.COMPLETE}
        no_best = best_trial(self.tune[variant.key]) is None
        return count(tune, DONE) >= s.trials and (no_best or seeds >= set(s.seeds))

    def finish_cell(self, variant: Variant) -> None:
        """Record the cell's outcome on its parent run, once."""
        parent = self.tracker.parent_run(variant)
        if self.tracker.client.get_run(parent).info.status == "FINISHED":
            return
        best = best_trial(self.tune[variant.key])
        finals = [
            t
            for t in self.final[variant.key].get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE
        ]
        accs = [t.user_attrs["test_acc"] for t in finals]
        tags = {
            "best_trial": best.number if best else "none (no trial completed)",
            "final_seeds": ",".join(str(t.user_attrs["seed"]) for t in finals),
        }
        self.tracker.set_tags(parent, tags)
        if best is not None:
            self.tracker.client.log_batch(
                parent,
                params=[mlflow.entities.Param(f"best_{k}", str(v)) for k, v in best.params.items()],
            )
        if accs:
            self.tracker.log_metrics(
                parent,
                {
                    "test_acc_mean": statistics.mean(accs),
                    "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n_final": len(accs),
                    "best_val_acc": best.value,
                },
                step=0,
            )
        self.tracker.finish(parent)
        self.say(f"{variant.key}: done; test acc {fmt_accs(accs)}", force=True)

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
        if force or not self.opts.quiet:
            print(text, flush=True)


def count(trials, states) -> int:
    return sum(t.state in states for t in trials)


def best_trial(study: optuna.Study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def suggest(trial: optuna.Trial, key: str, r) -> float | int:
    if r.integer:
        return trial.suggest_int(key, int(r.low), int(r.high), log=r.log)
    return trial.suggest_float(key, r.low, r.high, log=r.log)


def minutes(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def fmt_accs(accs: list[float]) -> str:
    if not accs:
        return "no final run completed"
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{statistics.mean(accs):.4f} ± {sd:.4f} (n={len(accs)})"
