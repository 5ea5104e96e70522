"""Run a study: tune every variant with Optuna, then train its best settings with N seeds.

Work comes in units: a tuning trial, or a final run (one seed). Workers claim units
under a lock, in variant order, so one worker finishes a variant before the next and
several workers share the budget exactly. Each unit is tracked twice: as an Optuna
trial (the source of truth for what is done) and as an MLflow child run (curves, tags).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import mlflow
import optuna
from optuna.trial import TrialState

from mnist_study.dataset import load_splits
from mnist_study.spec import StudySpec, Variant, refuse_changed_study
from mnist_study.storage import claim_lock, mark_alive, open_storage, reap_dead_trials, worker_id
from mnist_study.tracking import Tracker, prepare_store, provenance, recorded_spec
from mnist_study.train import Diverged, evaluate_test, resolve_device, train

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


class Interrupted(KeyboardInterrupt):
    """The worker's parent process is gone (killed): stop like on Ctrl-C."""


_ctrl_c_seen = threading.Event()


def on_ctrl_c(signum, frame) -> None:
    """Raise at once, and remember: Python drops an exception raised while a destructor
    runs, so the worker also checks the flag after every epoch and between units."""
    _ctrl_c_seen.set()
    raise KeyboardInterrupt


def stop_if_ctrl_c() -> None:
    if _ctrl_c_seen.is_set():
        raise KeyboardInterrupt


def study_names(spec: StudySpec, variant: Variant) -> tuple[str, str]:
    return f"{spec.name}.{variant.name}", f"{spec.name}.{variant.name}.final"


def run_study(spec: StudySpec, opts: RunOptions) -> None:
    """Validate inputs, create the stores, then run the workers until the study is done."""
    load_splits(opts.data_root, spec.defaults)  # refuses missing or corrupt data first
    recorded = recorded_spec(opts.tracking_uri, spec.name)
    refuse_changed_study(spec, recorded, opts.tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(opts.storage)
    experiment_id = prepare_store(opts.tracking_uri, spec.name, spec.path.read_text())
    for variant in spec.variants:
        for name in study_names(spec, variant):
            optuna.create_study(
                storage=storage, study_name=name, direction="maximize", load_if_exists=True
            )
    if opts.workers == 1:
        Worker(spec, opts, experiment_id, 0).loop()
        return
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    opts = dataclasses.replace(opts, threads=threads)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=worker_main, args=(spec, opts, experiment_id, i, os.getpid()))
        for i in range(opts.workers)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:  # they got the same Ctrl-C; let them record their trials
            p.join()
        raise
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker(s) {failed} exited with an error (see above)")


def worker_main(spec, opts, experiment_id, index, parent_pid) -> None:
    try:
        Worker(spec, opts, experiment_id, index, parent_pid).loop()
    except KeyboardInterrupt:  # its trial is already recorded; no traceback
        sys.exit(130)


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
        self.storage = open_storage(opts.storage)
        sampler_seed = spec.settings.sampler_seed + index  # same seed => same proposals
        self.tune, self.final = {}, {}
        for v in spec.variants:
            tune_name, final_name = study_names(spec, v)
            sampler = optuna.samplers.TPESampler(
                seed=sampler_seed, n_startup_trials=spec.settings.startup_trials, constant_liar=True
            )
            pruner = (
                optuna.pruners.MedianPruner(
                    n_startup_trials=spec.settings.startup_trials, n_warmup_steps=1
                )
                if spec.settings.pruner == "median"
                else optuna.pruners.NopPruner()
            )
            self.tune[v.name] = optuna.load_study(
                study_name=tune_name, storage=self.storage, sampler=sampler, pruner=pruner
            )
            self.final[v.name] = optuna.load_study(study_name=final_name, storage=self.storage)
        self.started, self.done_at_start = time.time(), None

    # --- claiming work -----------------------------------------------------------
    def claim(self):
        """Under the lock: reap dead trials, then the next unit, 'wait', or None (all done)."""
        with claim_lock(self.opts.storage):
            busy = False
            for v in self.spec.variants:
                for study in (self.tune[v.name], self.final[v.name]):
                    dead = reap_dead_trials(study)
                    self.tracker.kill_orphans(
                        [
                            t.system_attrs["mlflow_run_id"]
                            for t in dead
                            if "mlflow_run_id" in t.system_attrs
                        ],
                        "worker died",
                    )
                tune = self.tune[v.name].get_trials(deepcopy=False)
                if count(tune, TAKEN) < self.spec.settings.trials:
                    return self.start(self.tune[v.name], v, "tune")
                if count(tune, (TrialState.RUNNING,)):
                    busy = True
                    continue
                finals = self.final[v.name].get_trials(deepcopy=False)
                taken = {t.user_attrs.get("seed") for t in finals if t.state in TAKEN}
                free = [s for s in self.spec.settings.seeds if s not in taken]
                if free and best_trial(self.tune[v.name]) is not None:
                    return self.start(self.final[v.name], v, "final", seed=free[0])
                if count(finals, (TrialState.RUNNING,)):
                    busy = True
                    continue
                self.finish_variant(v)
            return "wait" if busy else None

    def start(self, study: optuna.Study, variant: Variant, role: str, seed: int | None = None):
        trial = study.ask()
        for key, value in worker_id().items():
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
        mark_alive(study, trial._trial_id)
        if seed is not None:
            trial.set_user_attr("seed", seed)
        parent = self.tracker.parent_run(variant.name, variant.description)
        return study, variant, role, trial, parent

    def loop(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_ctrl_c) if main else None
        _ctrl_c_seen.clear()
        try:
            while True:
                stop_if_ctrl_c()
                unit = self.claim()
                if unit is None:
                    break
                if unit == "wait":  # others still tune a variant whose finals come next
                    time.sleep(2)
                    continue
                self.run_unit(*unit)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self.say(f"worker {self.index}: nothing left to do", force=True)

    # --- running a unit ----------------------------------------------------------
    def run_unit(self, study: optuna.Study, variant: Variant, role: str, trial, parent: str):
        if role == "tune":
            params = {k: suggest(trial, k, r) for k, r in variant.search.items()}
            name = f"{variant.name}/trial-{trial.number}"
            extra = {}
        else:
            best = best_trial(self.tune[variant.name])
            params = dict(best.params, seed=trial.user_attrs["seed"])
            name = f"{variant.name}/seed-{params['seed']}"
            extra = {"seed": params["seed"], "tuned_by_trial": best.number}
        cfg = self.spec.config_for(variant, params)
        if self.opts.threads:
            cfg = cfg.replace(threads=self.opts.threads)
        tags = {
            "variant": variant.name,
            "role": role,
            "optuna_study": study.study_name,
            "optuna_trial": trial.number,
            "optuna_state": "RUNNING",
            "workers": self.opts.workers,
            **extra,
            **provenance(cfg, str(resolve_device(cfg))),
        }
        run_id = self.tracker.child_run(parent, name, cfg, {k: str(v) for k, v in tags.items()})
        study._storage.set_trial_system_attr(trial._trial_id, "mlflow_run_id", run_id)
        shown = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
        )
        self.say(f"{self.progress()} {name}: {shown}", force=True)

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            self.tracker.log_metrics(run_id, m, step=epoch)
            mark_alive(study, trial._trial_id)
            self.say(
                f"    epoch {epoch}/{cfg.epochs}  train acc {m['train_acc']:.4f} "
                f"loss {m['train_loss']:.4f} | val acc {m['val_acc']:.4f} "
                f"loss {m['val_loss']:.4f} | {m['epoch_seconds']:.1f}s"
            )
            stop_if_ctrl_c()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                raise Interrupted("parent process died")
            if role == "tune":
                trial.report(m["val_acc"], epoch)
                # At the last epoch the work is done: keep it as a complete trial.
                if epoch < cfg.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"median pruner at epoch {epoch}")

        splits = load_splits(self.opts.data_root, cfg)
        try:
            result = train(cfg, splits, on_epoch)
        except (optuna.TrialPruned, Diverged) as exc:
            reason = f"diverged: {exc}" if isinstance(exc, Diverged) else str(exc)
            trial.set_user_attr("prune_reason", reason)
            study.tell(trial, state=TrialState.PRUNED)
            self.tracker.set_tags(run_id, {"optuna_state": "PRUNED", "prune_reason": reason})
            self.tracker.finish(run_id, "FAILED" if isinstance(exc, Diverged) else "FINISHED")
            self.say(f"    pruned: {reason}", force=True)
            return
        except BaseException as exc:  # Ctrl-C, a killed parent, or a bug: record, re-raise
            interrupted = isinstance(exc, KeyboardInterrupt)
            reason = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            self.tracker.set_tags(run_id, {"optuna_state": "FAIL", "fail_reason": reason[:500]})
            self.tracker.finish(run_id, "KILLED" if interrupted else "FAILED")
            raise
        last = result.history[-1]
        if role == "final":
            test = evaluate_test(result.model, splits, cfg)
            self.tracker.log_metrics(run_id, test, step=cfg.epochs)
            trial.set_user_attr("test_acc", test["test_acc"])
            if self.opts.log_models:
                self.tracker.log_model(run_id, result.model)
            self.say(f"    test acc {test['test_acc']:.4f}", force=True)
        study.tell(trial, last["val_acc"])
        self.tracker.set_tags(run_id, {"optuna_state": "COMPLETE"})
        self.tracker.finish(run_id)

    def finish_variant(self, variant: Variant) -> None:
        """Record the variant's outcome on its parent run, once."""
        parent = self.tracker.parent_run(variant.name, variant.description)
        if self.tracker.client.get_run(parent).info.status == "FINISHED":
            return
        best = best_trial(self.tune[variant.name])
        finals = [
            t
            for t in self.final[variant.name].get_trials(deepcopy=False)
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
        self.say(f"{variant.name}: done; test acc {fmt_accs(accs)}", force=True)

    # --- progress ----------------------------------------------------------------
    def progress(self) -> str:
        s = self.spec.settings
        total = len(self.spec.variants) * (s.trials + len(s.seeds))
        done = sum(
            count(self.tune[v.name].get_trials(deepcopy=False), DONE)
            + count(self.final[v.name].get_trials(deepcopy=False), DONE)
            for v in self.spec.variants
        )
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
