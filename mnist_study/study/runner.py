"""Run a study: tune every variant with Optuna, then train its best settings with N seeds.

Workers (worker.py) claim units of work under a lock, so several workers, or several
commands, share the budget exactly. Nothing is claimed before every input is checked
and the two stores (Optuna's record, MLflow's mirror) are shown to agree.
"""

from __future__ import annotations

import sys
import warnings

import optuna

from mnist_study.errors import StorageLost, StudyIncomplete
from mnist_study.study import storage as st
from mnist_study.study.experiment import check_tracking_uri, experiment_tags, prepare_store
from mnist_study.study.legacy import recorded_spec_text
from mnist_study.study.processes import REFUSED, run_workers
from mnist_study.study.records import (
    all_study_names,
    check_stores_agree,
    reconcile_runs,
    refuse_changed_study,
    study_names,
)
from mnist_study.study.scheduler import progress_counts, reap_studies
from mnist_study.study.signals import Interrupted
from mnist_study.study.spec import StudySpec, Tuning
from mnist_study.study.tracking import Tracker
from mnist_study.study.worker import RunOptions, Worker
from mnist_study.training.dataset import load_splits
from mnist_study.training.train import check_device

__all__ = ["RunOptions", "StudyIncomplete", "run_study"]


def preflight(spec: StudySpec, opts: RunOptions) -> None:
    """Everything that can be refused is refused here, before either store is written."""
    load_splits(opts.data_root, spec.defaults)  # refuses missing or corrupt data first
    check_device(spec.defaults, f"{spec.path}: defaults")
    for v in spec.variants:
        check_device(spec.config_for(v, {}), f"{spec.path}: variants.{v.name}")
    check_tracking_uri(opts.tracking_uri)
    st.check_storage_location(opts.storage)
    recorded = recorded_spec_text(experiment_tags(opts.tracking_uri, spec.name) or {})
    extension = refuse_changed_study(spec, recorded, opts.tracking_uri)
    if extension:
        print(f"extending study {spec.name!r}: {extension}; its finished units are kept")


OBJECTIVE = "validation accuracy at the last evaluation"


def experiment_description(spec: StudySpec) -> str:
    """What the MLflow UI shows atop the study: its question, budget and how to run it."""
    s, d = spec.settings, spec.defaults
    return (
        f"{spec.resolved.get('description', '')}\n\n"
        f"{len(spec.variants)} variants at {', '.join(f'{n:,}' for n in spec.sizes)} training "
        f"images; each cell tuned by Optuna ({s.trials} trials), then {len(s.seeds)} seeds "
        f"on the test set; {d.length}, batch {d.batch_size}.\n\n"
        f"Spec: `{spec.path}`. Run: `mnist-study run {spec.path} --workers auto`; "
        f"report: `mnist-study report {spec.path}`."
    ).strip()


def spec_tag(spec: StudySpec) -> str:
    """The experiment's spec tag: a summary line, which is what MLflow's experiment list
    shows of a tag, then the resolved spec (one line of JSON) that a resume is checked
    against."""
    s, sizes = spec.settings, len(spec.sizes)
    return (
        f"{spec.path.name}: {len(spec.variants)} variants x {sizes} size{'s' * (sizes > 1)}; "
        f"{s.trials} trials, {len(s.seeds)} seeds, {s.tunings} tuning{'s' * (s.tunings > 1)} "
        f"per cell (the resolved spec follows as JSON)\n{spec.record()}"
    )


def run_study(spec: StudySpec, opts: RunOptions) -> None:
    """Check inputs and stores, create the studies, then run the workers until done."""
    preflight(spec, opts)
    run_workers_until_done(spec, opts, create_stores(spec, opts))


def create_stores(spec: StudySpec, opts: RunOptions) -> str:
    """The MLflow experiment and the cells' Optuna studies, created once (or found, on a
    resume, after checking that the two stores agree); returns the experiment's id."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not st.storage_exists(opts.storage):  # refuse before creating an empty one
        check_stores_agree(spec, opts.tracking_uri, opts.storage, None)
    storage = st.open_storage(opts.storage)
    # Under the claim lock: a second command started at once waits, then sees the first's
    # studies as existing ones (and never races MLflow's table creation).
    with st.claim_lock(opts.storage):
        check_stores_agree(spec, opts.tracking_uri, opts.storage, storage)
        experiment_id = prepare_store(
            opts.tracking_uri,
            spec.name,
            experiment_description(spec),
            spec_tag(spec),
            # Compared again where the spec is recorded: two commands started at once
            # with different designs under one name both passed the preflight.
            lambda tags: refuse_changed_study(spec, recorded_spec_text(tags), opts.tracking_uri),
        )
        reconcile_runs(spec, storage, Tracker(opts.tracking_uri, experiment_id))
        for tuning in spec.tunings:
            for name, (metric, role) in zip(
                study_names(spec, tuning), study_roles(tuning), strict=True
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


def run_workers_until_done(spec: StudySpec, opts: RunOptions, experiment_id: str) -> None:
    if opts.workers == 1:
        Worker(spec, opts, experiment_id, 0).loop()
        return
    deaths = run_workers(
        worker_main,
        (spec, opts, experiment_id),
        opts.workers,
        lambda: reap(spec, opts, experiment_id),
    )
    done, total = progress_counts(spec, st.open_storage(opts.storage))
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


def reap(spec: StudySpec, opts: RunOptions, experiment_id: str) -> None:
    """Mark trials of dead workers FAIL and their runs KILLED (any process may do it)."""
    storage = st.open_storage(opts.storage)
    tracker = Tracker(opts.tracking_uri, experiment_id)
    with st.claim_lock(opts.storage):
        reap_studies(
            [optuna.load_study(study_name=n, storage=storage) for n in all_study_names(spec)],
            tracker,
        )
