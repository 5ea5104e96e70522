"""Run a study: every input and both stores checked (preflight), the studies created,
then workers (this process, or one process each) claim units of work under a lock until
none is left, so several workers, or several commands, share the budget exactly. A
worker runs each unit's whole life (Worker.run_unit), read top to bottom like Optuna's
own `_run_trial`: link, train, report each point, prune, tell, end."""

from __future__ import annotations

import multiprocessing
import sys
import time

import optuna
from optuna.trial import TrialState

from mnist_study.errors import StudyIncomplete, said_in_one_line
from mnist_study.study.cells import close_finished_cells, newly_finished_round
from mnist_study.study.console import Console, shown_params
from mnist_study.study.ledger import Ledger
from mnist_study.study.liveness import TrialTaken, mark_alive
from mnist_study.study.optuna_storage import set_system_attrs, trial_id
from mnist_study.study.pace import PACE, UnitPace, Work, eta, study_seconds_left
from mnist_study.study.processes import REFUSED, run_workers, start_fork_server
from mnist_study.study.record import study_identity
from mnist_study.study.restore import Restoring, check_restorable, restore
from mnist_study.study.run_options import RunOptions
from mnist_study.study.scheduler import Idle, Scheduler, Unit, proposal_seed
from mnist_study.study.signals import (
    Interrupted,
    signals_deferred,
    stop_if_signalled,
    stopping_on_signals,
)
from mnist_study.study.slurm import check_reach
from mnist_study.study.slurm_watch import run_on_slurm
from mnist_study.study.spec import StudySpec
from mnist_study.study.stores import StudyStores
from mnist_study.tracking.names import Role
from mnist_study.tracking.outcome import Outcome
from mnist_study.tracking.retries import bound_remote_retries
from mnist_study.training.mnist_data import load_splits
from mnist_study.training.train import check_device, fit, point_line


def preflight(spec: StudySpec, opts: RunOptions) -> StudyStores:
    """Everything that can be refused is refused here, before either store is written."""
    load_splits(opts.data_root, spec.defaults)  # refuses missing or corrupt data first
    check_device(spec.defaults, f"{spec.path}: defaults")
    for v in spec.variants:
        check_device(spec.config_for(v, {}), f"{spec.path}: variants.{v.name}")
    identity = study_identity(spec.defaults.replace("run", threads=opts.run_threads(spec.defaults)))
    stores = StudyStores(spec, opts.tracking_uri, opts.storage, identity, opts.allow_mixed)
    resume = stores.check()
    if opts.slurm:  # before the first write: a store no worker could reach is refused
        for line in check_reach(opts.tracking_uri, opts.storage, opts.data_root, opts.slurm):
            print(line, flush=True)
    if resume.extension:
        print(f"extending study {spec.name!r}: {resume.extension}; its finished units are kept")
    return stores


def run_study(spec: StudySpec, opts: RunOptions, restoring: Restoring | None = None) -> None:
    """Check inputs and stores, create the studies (with the published tunings of
    `restoring` restored), then run the workers until done."""
    if opts.workers > 1 and not opts.slurm:
        start_fork_server(__name__)  # its imports overlap the checks below
    stores = preflight(spec, opts)
    if restoring:
        check_restorable(stores, restoring)
    if stores.resume.finished_on:  # nothing runs, so nothing mixes: the stores stay as they are
        print(
            f"study {spec.name!r} is complete: every unit ran, on other code or setup than "
            f"now ({stores.resume.finished_on}); nothing to run, so nothing mixes. Its report: "
            f"mnist-study report {spec.path}",
            flush=True,
        )
        return
    experiment_id = stores.create()
    stores.attach(experiment_id)
    with stores.claim_lock():  # dead workers' trials failed first, so that they count
        stores.reap()
        lines, restored = (
            restore(stores, restoring, opts.command(spec.path)) if restoring else ([], 0)
        )
        for line in lines:
            print(line, flush=True)
    ledger = stores.ledger()
    done, total = ledger.progress()
    resumed = resume_line(stores.spec.name, ledger, restored)
    if resumed:
        print(resumed, flush=True)
    if done == total:  # no worker to start: close the cells a killed command left open
        with stores.claim_lock():
            for line in close_finished_cells(stores, set()):
                print(line, flush=True)
        return
    try:
        run_workers_of(spec, opts, experiment_id, stores)
    except (KeyboardInterrupt, StudyIncomplete):
        stop_parents(stores)
        raise


def run_workers_of(spec, opts, experiment_id, stores: StudyStores) -> None:
    """This command's workers: itself, one process each, or Slurm jobs, until all are done."""
    if opts.slurm:
        run_on_slurm(spec, opts, experiment_id, stores, f"{__name__}:worker_main")
        return
    if opts.workers == 1:
        Worker(spec, opts, experiment_id, 0).loop()
        return

    def reap() -> None:  # a dead worker's trial, failed at once (any process may do it)
        with stores.claim_lock():
            stores.reap()

    deaths = run_workers(worker_main, (spec, opts, experiment_id), opts.workers, reap)
    done, total = stores.ledger().progress()
    if done < total:
        raise StudyIncomplete(
            f"study {spec.name!r} incomplete ({done} of {total} units done) after "
            f"{len(deaths)} worker(s) died; run the same command again to resume"
        )


def stop_parents(stores: StudyStores) -> None:
    """A stopped command's unfinished cells: their parent runs end KILLED rather than
    show MLflow's RUNNING clock until a resume, unless another command (on any host)
    still runs a unit of theirs."""
    with signals_deferred(), stores.claim_lock():
        stores.reap()
        stores.tracker.stop_parents(stores.ledger().busy_cells())


def resume_line(study: str, ledger: Ledger, restored: int = 0) -> str:
    """What a resume keeps and redoes, in a line ('' for a study not begun); a study
    whose every done unit was `restored` by this command begins, it does not resume."""
    (done, total), failed = ledger.progress(), ledger.failed
    if not done and not failed:
        return ""
    if done == total:
        return f"study {study!r} is complete: all {total} units done; nothing to run"
    if restored == done and not failed:
        return (
            f"study {study!r} begins from its published runs: {done} of {total} units "
            f"restored, {total - done} to run"
        )
    return (
        f"resuming study {study!r}: {done} of {total} units done and kept, "
        f"{total - done} to run; {failed} interrupted or failed run(s) stay recorded as FAIL"
    )


def worker_main(spec, opts, experiment_id, index) -> None:
    bound_remote_retries()  # a process of its own: its first retry is said too
    try:
        Worker(spec, opts, experiment_id, index).loop()
    except Interrupted as exc:  # its trial is already recorded; no traceback
        sys.exit(exc.exit_code)
    except Exception as exc:  # the environment's failure (a store lost, a server down):
        if not said_in_one_line(exc):  # one line, and the whole command stops (exit 2)
            raise
        sys.exit(REFUSED)


class Worker:
    """Runs the units it claims until none is left, one at a time."""

    def __init__(
        self,
        spec: StudySpec,
        opts: RunOptions,
        experiment_id: str,
        index: int,
    ):
        self.spec, self.opts, self.index = spec, opts, index
        # The command that started this worker process (None: this is the command).
        self.command_process = multiprocessing.parent_process()
        self.stores = StudyStores(spec, opts.tracking_uri, opts.storage)
        self.stores.attach(experiment_id)
        self.scheduler = Scheduler(spec, self.stores, index)
        self.console = Console(index, opts.workers, opts.quiet)
        self.closed: set[str] = set()  # cells whose parent run this worker saw closed
        self.parents: dict[str, str] = {}  # cell -> its MLflow parent run
        self.estimate: tuple[float, float | None] | None = None  # (when, study seconds left)

    def loop(self) -> None:
        with stopping_on_signals():
            while True:
                stop_if_signalled()
                unit, finished = self.next_unit()
                for line in finished:
                    self.console.say(line, force=True)
                if unit is Idle.DONE:
                    break
                if unit is Idle.WAIT:  # others run the trial the next unit depends on
                    self.console.waiting(self.scheduler.waiting_on)
                    time.sleep(0.5)  # a unit can take about a second at small sizes
                    continue
                self.run_unit(unit)
        self.console.say(f"worker {self.index}: nothing left to do", force=True)

    def next_unit(self) -> tuple[Unit | Idle, list[str]]:
        """The next unit (or WAIT, DONE) and a line for each cell, or round, it found
        finished."""
        with self.stores.claim_lock():
            self.stores.reap()
            ledger = self.stores.ledger()  # closing cells changes no trial: one read serves both
            finished = close_finished_cells(self.stores, self.closed, ledger)
            if k := newly_finished_round(self.stores, ledger):
                report = self.opts.report_command(self.spec.path)
                finished.append(
                    f"round {k} of {self.spec.settings.tunings} finished; read the first {k} "
                    f"(an interim read): {report} --tunings {k}"
                )
            unit = self.scheduler.claim(ledger)
            if isinstance(unit, Unit) and unit.cell.key not in self.parents:
                command = self.opts.command(self.spec.path)
                self.parents[unit.cell.key] = self.stores.parent_run(unit.cell, command)
            return unit, finished

    def run_unit(self, unit: Unit) -> None:
        """A unit's whole life: its point and configuration, its MLflow run linked to its
        trial, trained with a heartbeat, a line and the pruner at each evaluation point,
        the test set on a final seed, then the trial told its outcome, before the run is
        closed: Optuna's record is written before MLflow's mirror, so a crash between
        them leaves a run the next resume closes, never a run closed for an open trial."""
        study, trial, tracker = unit.study, unit.trial, self.stores.tracker
        final = unit.role == Role.FINAL
        run_id = None
        try:
            # A signal between the run's creation and its link would leave a killed run
            # that its FAIL trial does not name: it is raised once both are written.
            with signals_deferred():
                name, params, cfg, run_id = self.create_run(unit)
                set_system_attrs(study, trial, {"mlflow_run_id": run_id})
            progress = self.console.progress(*self.stores.ledger().progress(), self.study_left())
            self.console.say(f"{progress} {name}: {shown_params(params)}", force=True)
            pace = UnitPace(Work.of(cfg, final))

            def on_point(point: int, last: int, metrics: dict[str, float]) -> None:
                # First: a trial taken from it gets no more points (nor a test set).
                mark_alive(study, trial, {PACE: pace.point(metrics["train_seconds"])})
                tracker.log_metrics(run_id, metrics, step=point)
                if not self.opts.quiet:
                    line = point_line(cfg, point, last, metrics)
                    unit_left = pace.seconds_left()
                    left = self.study_left((trial_id(trial), unit_left))
                    self.console.say(f"  {line} | unit {eta(unit_left)}, study {eta(left)} left")
                stop_if_signalled()
                if self.command_process and not self.command_process.is_alive():
                    raise Interrupted("parent process died")
                if not final:
                    trial.report(metrics["val_acc"], point)
                    # At the last point the work is done: keep it as a complete trial.
                    if point < last and trial.should_prune():
                        raise optuna.TrialPruned(f"median pruner at {cfg.axis} {point}")

            training = fit(cfg, load_splits(self.opts.data_root, cfg), on_point, test=final)
            result = training.result
            if final:
                tracker.log_metrics(run_id, training.test, step=training.last)
                if self.opts.log_models:
                    tracker.log_model(run_id, training.model)
        except TrialTaken as exc:  # its run was closed by whoever ended the trial
            self.console.say(f"    {exc}: left to it, this worker goes on", force=True)
            return
        except BaseException as exc:  # pruned, diverged, Ctrl-C, a killed parent, a bug
            if not self.end_stopped(unit, run_id, exc):
                raise
            return
        if final:
            trial.set_user_attr("test_acc", result["test_acc"])
        study.tell(trial, result["val_acc"])
        tracker.end(run_id, Outcome.COMPLETE)
        if final:
            self.console.say(f"    test acc {result['test_acc']:.4f}", force=True)

    def end_stopped(self, unit: Unit, run_id: str | None, exc: BaseException) -> bool:
        """A unit stopped by `exc`: its trial told why, then its run closed (Optuna's
        record first, as for a finished unit); whether it was pruned (else re-raised)."""
        study, trial, tracker = unit.study, unit.trial, self.stores.tracker
        outcome = Outcome.of(exc)
        pruned = outcome.trial_state == TrialState.PRUNED
        trial.set_user_attr("prune_reason" if pruned else "fail_reason", outcome.reason(exc))
        study.tell(trial, state=outcome.trial_state)
        if run_id is None:  # stopped before the run was linked: found by its tags
            run_id = tracker.trial_run(study.study_name, trial.number)
        if run_id is not None:
            tracker.end(run_id, outcome, outcome.reason(exc))
        if pruned:
            self.console.say(f"    pruned: {outcome.reason(exc)}", force=True)
        return pruned

    def study_left(self, own: tuple[int, float] | None = None) -> float | None:
        """Seconds the study has left, priced from every unit's measured pace: read from
        the stores at most every 15 s (two reads per tuning; a large study on a database
        would spend seconds a line), counted down in between."""
        now = time.monotonic()
        if self.estimate is None or now - self.estimate[0] > 15 or self.estimate[1] is None:
            left = study_seconds_left(self.stores.ledger(), self.opts.workers, own)
            self.estimate = now, left
        at, seconds = self.estimate
        return None if seconds is None else max(seconds - (now - at), own[1] if own else 0.0)

    def create_run(self, unit: Unit) -> tuple[str, dict, object, str]:
        """The unit's MLflow run, tagged with its Optuna trial (which is how the reaper
        finds it if the worker dies before the run's id is on the trial): (name, params,
        config, run id)."""
        name, params, extra = self.point(unit)
        cfg = self.spec.config_for(unit.cell, params)
        cfg = cfg.replace(threads=self.opts.run_threads(cfg))
        tags = {
            "variant": unit.cell.name,
            "cell": unit.cell.key,
            "train_size": cfg.train_size,
            "role": unit.role,
            "optuna_study": unit.study.study_name,
            "optuna_trial": unit.trial.number,
            "optuna_state": "RUNNING",
            "workers": self.opts.workers,
            **extra,
        }
        run_id = self.stores.tracker.create_run(
            name,
            cfg,
            tags,
            unit.role == Role.FINAL,
            self.opts.command(self.spec.path),
            parent_id=self.parents[unit.cell.key],
        )
        return name, params, cfg, run_id

    def point(self, unit: Unit) -> tuple[str, dict, dict]:
        """(run name, params, tags) of a unit: a tuning trial's proposed point, or the
        tuning's best point with a final seed."""
        tuning = unit.tuning
        extra = {"tuning": tuning.index, "sampler_seed": tuning.sampler_seed}
        if unit.role == Role.TUNE:
            extra |= {"slot": unit.slot, "proposal_seed": proposal_seed(tuning, unit.slot)}
            return f"{tuning.key}/trial-{unit.slot}", dict(unit.trial.params), extra
        best = self.stores.tuning_ledger(tuning).best
        extra |= {"seed": unit.seed, "tuned_by_trial": best.user_attrs.get("slot")}
        return f"{tuning.key}/seed-{unit.seed}", dict(best.params, seed=unit.seed), extra
