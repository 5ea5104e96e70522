"""Run a study: tune every variant with Optuna, then train its best settings with N seeds.

Workers (worker.py) claim units of work under a lock, so several workers, or several
commands, share the budget exactly. Nothing is claimed before every input is checked
and the two stores (Optuna's record, MLflow's mirror) are shown to agree.
"""

from __future__ import annotations

import sys

from mnist_study.errors import StorageLost, StudyIncomplete
from mnist_study.study.processes import REFUSED, run_workers
from mnist_study.study.signals import Interrupted
from mnist_study.study.spec import StudySpec
from mnist_study.study.stores import StudyStores
from mnist_study.study.worker import RunOptions, Worker
from mnist_study.training.splits import load_splits
from mnist_study.training.train import check_device


def preflight(spec: StudySpec, opts: RunOptions) -> StudyStores:
    """Everything that can be refused is refused here, before either store is written."""
    load_splits(opts.data_root, spec.defaults)  # refuses missing or corrupt data first
    check_device(spec.defaults, f"{spec.path}: defaults")
    for v in spec.variants:
        check_device(spec.config_for(v, {}), f"{spec.path}: variants.{v.name}")
    stores = StudyStores(spec, opts.tracking_uri, opts.storage)
    extension = stores.check()
    if extension:
        print(f"extending study {spec.name!r}: {extension}; its finished units are kept")
    return stores


def run_study(spec: StudySpec, opts: RunOptions) -> None:
    """Check inputs and stores, create the studies, then run the workers until done."""
    stores = preflight(spec, opts)
    experiment_id = stores.create()
    if opts.workers == 1:
        Worker(spec, opts, experiment_id, 0).loop()
        return
    stores.attach(experiment_id)

    def reap() -> None:  # a dead worker's trial, failed at once (any process may do it)
        with stores.claim_lock():
            stores.reap()

    deaths = run_workers(worker_main, (spec, opts, experiment_id), opts.workers, reap)
    done, total = stores.progress()
    if done < total:
        raise StudyIncomplete(
            f"study {spec.name!r} incomplete ({done} of {total} units done) after "
            f"{len(deaths)} worker(s) died; run the same command again to resume"
        )


def worker_main(spec, opts, experiment_id, index, parent_pid) -> None:
    try:
        Worker(spec, opts, experiment_id, index, parent_pid).loop()
    except Interrupted as exc:  # its trial is already recorded; no traceback
        sys.exit(exc.exit_code)
    except StorageLost as exc:  # one line, and the command stops (exit code 2)
        print(f"mnist-study: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(REFUSED)
