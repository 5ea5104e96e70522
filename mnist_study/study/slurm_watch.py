"""The submitting side of `run --launcher slurm`: the array submitted (or a live one
attached to), the study's progress printed from the stores while the jobs run, Ctrl-C
passed on as a cancel of the array."""

from __future__ import annotations

import time

from optuna.trial import FrozenTrial, TrialState

from mnist_study.errors import StudyIncomplete
from mnist_study.study.cells import fmt_accs, test_accs
from mnist_study.study.console import minutes, shown_params
from mnist_study.study.pace import study_seconds_left
from mnist_study.study.signals import Interrupted, stop_if_signalled, stopping_on_signals
from mnist_study.study.slurm import (
    ARRAYS_TAG,
    array_ids,
    cancel,
    job_states,
    live,
    submit,
)
from mnist_study.study.spec import StudySpec
from mnist_study.study.stores import StudyStores

POLL_S = 1.0  # a small unit lasts seconds; a look at the stores costs milliseconds


def run_on_slurm(spec: StudySpec, opts, experiment_id: str, stores: StudyStores, worker: str):
    """Submit what is missing of opts.workers worker jobs (`worker`: 'module:function',
    called (spec, opts, experiment_id, index)), then watch them until they end (not with
    --detach)."""
    arrays = array_ids(stores.tracker.experiment_tag(ARRAYS_TAG))
    states = job_states(arrays)
    running = live(states)
    if running:
        print(
            f"attaching to Slurm array(s) {', '.join(sorted({j.split('_')[0] for j in running}))}"
            f": {len(running)} worker job(s) pending or running",
            flush=True,
        )
    need = opts.workers - len(running)
    if need > 0:
        args = (spec, opts, experiment_id)
        array = submit(worker, args, len(running), need, opts.slurm, spec.name)
        arrays.append(array)
        stores.tracker.set_experiment_tag(ARRAYS_TAG, ",".join(arrays))
        print(
            f"submitted Slurm array {array}: {need} worker job(s), logs in {opts.slurm.folder}",
            flush=True,
        )
    if opts.detach:
        return
    watch(spec, stores, arrays, opts.workers)


def watch(spec: StudySpec, stores: StudyStores, arrays: list[str], workers: int) -> None:
    """Print each unit's start and end and each job's state until no job of `arrays`
    is pending or running; on a stop signal cancel them, wait for them to end (each
    records its unit FAIL) and raise Interrupted."""
    lines = StudyLines(spec, stores, workers)
    jobs: dict[str, str] = {}
    with stopping_on_signals():
        try:
            while True:
                states = job_states(arrays)
                for job, (state, where) in sorted(states.items()):
                    if jobs.get(job) != state:
                        waits = state == "PENDING" and where not in ("", "(None)")
                        at = f" on {where}" if state == "RUNNING" else f" {where}" * waits
                        print(f"slurm job {job}: {state}{at}", flush=True)
                        jobs[job] = state
                for line in lines.new():
                    print(line, flush=True)
                if not live(states):
                    break
                stop_if_signalled()
                time.sleep(POLL_S)
        except Interrupted:
            print(f"cancelling Slurm array(s) {', '.join(arrays)}", flush=True)
            cancel(arrays)
            deadline = time.time() + 120  # Slurm's KillWait, then SIGKILL
            while live(job_states(arrays)) and time.time() < deadline:
                time.sleep(1)
            for line in lines.new():
                print(line, flush=True)
            raise
    with stores.claim_lock():
        stores.reap()
    done, total = stores.ledger().progress()
    if done < total:
        ended = ", ".join(f"{j} {s}" for j, s in sorted(jobs.items()))
        raise StudyIncomplete(
            f"study {spec.name!r} incomplete ({done} of {total} units done) after its Slurm "
            f"jobs ended ({ended}); run the same command again to resume"
        )


class StudyLines:
    """A line for each unit that started or ended since the last look, read from
    Optuna's record (the workers' own lines are in their Slurm logs)."""

    def __init__(self, spec: StudySpec, stores: StudyStores, workers: int):
        self.spec, self.stores, self.workers = spec, stores, workers
        self.started = time.time()
        self.seen = {key: state for key, state, _ in self.trials()}  # a resume's past: quiet
        self.closed: set[str] = set()
        self.cells_done()

    def trials(self):
        for state in self.stores.ledger().tunings.values():
            for final, trials in ((False, state.trials), (True, state.finals)):
                for t in trials:
                    yield (state.tuning.key, final, t.number), t.state, (state.tuning, final, t)

    def new(self) -> list[str]:
        out, progress = [], None
        for key, state, (tuning, final, t) in list(self.trials()):
            if self.seen.get(key) == state:
                continue
            self.seen[key] = state
            if progress is None:
                progress = self.progress()
            out.append(describe(tuning, final, t, progress))
        return out + self.cells_done() if out else out

    def cells_done(self) -> list[str]:
        """`cell: done; test acc ...` once for each cell whose units are all done, as a
        local worker says it when it closes the cell (here a worker in Slurm does)."""
        out, ledger = [], self.stores.ledger()
        for cell in self.spec.cells:
            if cell.key in self.closed or not ledger.cell_finished(cell):
                continue
            self.closed.add(cell.key)
            out.append(f"{cell.key}: done; test acc {fmt_accs(test_accs(ledger.of_cell(cell)))}")
        return out

    def progress(self) -> str:
        ledger = self.stores.ledger()
        done, total = ledger.progress()
        left = study_seconds_left(ledger, self.workers)
        elapsed = minutes(time.time() - self.started)
        return f"{done}/{total} done | {elapsed}" + (f", ~{minutes(left)} left" if left else "")


def describe(tuning, final: bool, t: FrozenTrial, progress: str) -> str:
    """`[w1 3/48 done | 0m40s, ~2m left] cell/t0/trial-2: lr=0.00551 (on node-3)` as a
    unit starts; `[w1]     cell/t0/trial-2: val acc 0.9130` as it ends."""
    worker = t.system_attrs.get("worker", "?")
    unit = f"seed-{t.user_attrs.get('seed')}" if final else f"trial-{t.user_attrs.get('slot')}"
    name = f"{tuning.key}/{unit}"
    if t.state == TrialState.RUNNING:
        shown = shown_params(t.params)
        host = t.system_attrs.get("host", "?")
        return f"[w{worker} {progress}] {name}: {shown or 'best point'} (on {host})"
    if t.state == TrialState.COMPLETE:
        what = f"test acc {t.user_attrs['test_acc']:.4f}" if final else f"val acc {t.value:.4f}"
    elif t.state == TrialState.PRUNED:
        what = f"pruned: {t.user_attrs.get('prune_reason', '')}"
    else:
        what = f"{t.state.name}: {t.user_attrs.get('fail_reason', 'no reason recorded')}"
    return f"[w{worker}]     {name}: {what}"
