"""`mnist-study status`: where a study stands, from its stores alone (units done and
running, where and how recently heard from, the time left, its Slurm jobs), whoever
runs it: local workers, other commands, other machines or a Slurm array."""

from __future__ import annotations

import time

from mnist_study.store_paths import store_flags
from mnist_study.study.console import minutes
from mnist_study.study.pace import study_seconds_left
from mnist_study.study.record import refuse_changed_study
from mnist_study.study.slurm import ARRAYS_TAG, array_ids, job_states
from mnist_study.study.slurm_watch import describe
from mnist_study.study.spec import StudySpec
from mnist_study.study.stored import read_stored
from mnist_study.study.stores import OptunaSide, StudyStores
from mnist_study.tracking.names import NOTE_TAG, Role


def status_lines(spec: StudySpec, stores: StudyStores) -> list[str]:
    """Where a study stands: units done, tunings restored from published runs, rounds
    finished (a study that runs in rounds), those running (where, last sign of life),
    the time left, and its Slurm jobs."""
    ledger = stores.ledger()
    (done, total), running, now = ledger.progress(), ledger.running(), time.time()
    left = study_seconds_left(ledger, max(1, len(running)))
    out = [
        f"study {spec.name!r}: {done} of {total} units done, {len(running)} running"
        + (f", ~{minutes(left)} left at {max(1, len(running))} worker(s)" if left else "")
    ]
    for run in stores.tracker.runs(f"tags.role = '{Role.RESTORED}'"):  # run --restore
        out.append(f"  {run.data.tags.get(NOTE_TAG, 'tunings restored')}")
    finished, next_done, per_round = ledger.rounds()
    if spec.settings.tunings > 1 and finished < spec.settings.tunings:
        out.append(
            f"  rounds finished: {finished} of {spec.settings.tunings} (round {finished + 1}: "
            f"{next_done} of {per_round} units done)"
        )
        if finished:  # what a user waits on a round for
            flags = store_flags(stores.tracking_uri, stores.optuna.url)
            command = ["mnist-study", "report", str(spec.path), *flags, "--tunings", str(finished)]
            out[-1] += f"; read them: {' '.join(command)}"
    for tuning, final, t in running:
        beat = now - t.system_attrs.get("heartbeat", now)
        out.append(describe(tuning, final, t, f"{done}/{total} done").split("] ", 1)[1])
        out[-1] = f"  running: {out[-1]}, last heartbeat {beat:.0f} s ago"
    arrays = array_ids(stores.tracker.experiment_tag(ARRAYS_TAG))
    if arrays:
        states = job_states(arrays)
        jobs = ", ".join(f"{j} {s}" + (f" on {w}" if s == "RUNNING" else "") for j, (s, w) in
                         sorted(states.items())) or "none left in squeue"  # fmt: skip
        out.append(f"  Slurm array(s) {', '.join(arrays)}: {jobs}")
    return out


def print_status(spec: StudySpec, tracking_uri: str, storage: str) -> None:
    stored = read_stored(tracking_uri, spec.name, storage)
    stores = StudyStores(spec, tracking_uri, storage)
    if stored is None or not stores.optuna.exists():
        print(f"study {spec.name!r}: not started in {tracking_uri} and {storage}")
        return
    # Both records read, compared as `run` compares them: a journal lost, emptied or
    # swapped for another run's is said in one line, not met as a missing record.
    side = stored.side if isinstance(stored.side, OptunaSide) else OptunaSide(0, {})
    stores.agree(side, stored.runs)
    # Read by this spec where it is the study or extends it (its new tunings not started
    # until `run`); another design is refused in run's words.
    refuse_changed_study(spec, stored.record.spec, tracking_uri)
    stores.attach(stored.experiment_id, created_only=True)
    print("\n".join(status_lines(spec, stores)))
