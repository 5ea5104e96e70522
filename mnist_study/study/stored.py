"""A study as its two stores hold it, read and never written: the one reader that the
read-only commands (report, plan, status) go through. It assumes no tag, side or run is
there: a study the store lacks is None (each command says what it needs instead); an
experiment that holds no study, a storage it cannot open, or a journal of another run
of the study is refused in one line naming the store."""

from __future__ import annotations

from dataclasses import dataclass

from mnist_study.errors import SpecError, StoresDisagree
from mnist_study.study.optuna_storage import optuna_storage
from mnist_study.study.record import NoStudy, StudyRecord
from mnist_study.study.spec import StudySpec
from mnist_study.study.stores import OptunaSide, optuna_side
from mnist_study.tracking.runs import unit_runs
from mnist_study.tracking.store import check_tracking_uri, find_experiment


@dataclass(frozen=True)
class StoredStudy:
    experiment_id: str
    record: StudyRecord
    """What the experiment records the study to be (its spec, identity, extensions)."""
    side: OptunaSide | str
    """Optuna's record of its trials, or why it was not read (none given, none there)."""
    runs: dict[str, str]
    """MLflow's tuning and final runs: run id -> status."""


def read_stored(tracking_uri: str, name: str, storage: str | None = None) -> StoredStudy | None:
    """Study `name` as the MLflow store at `tracking_uri` (which must exist) and, where
    given, the Optuna `storage` hold it; None where the store holds no experiment of
    that name."""
    check_tracking_uri(tracking_uri, must_exist=True)
    found = find_experiment(tracking_uri, name)
    if found is None:
        return None
    try:
        record = StudyRecord.from_tags(found.tags, name)
    except NoStudy as exc:
        # Every read after this assumes a study's runs and tags: refuse any other experiment.
        raise SpecError(
            f"MLflow experiment {name!r} in {tracking_uri} holds no study: {exc}; it was "
            f"made by hand, by another tool or by `mnist-study train --mlflow`, not by "
            f"`mnist-study run`"
        ) from None
    side = optuna_record(storage, record.spec)
    runs = unit_runs(tracking_uri, found.experiment_id)
    if isinstance(side, OptunaSide) and runs and not set(side.run_ids) & set(runs):
        raise StoresDisagree(
            f"the Optuna storage {storage} links none of the {len(runs)} runs of study "
            f"{name!r} in {tracking_uri} (a journal of another run of it?); give the "
            f"storage the study ran with (--storage)"
        )
    return StoredStudy(found.experiment_id, record, side, runs)


def optuna_record(storage: str | None, spec: StudySpec) -> OptunaSide | str:
    """Optuna's side of the record (the MLflow run ids it links to trials, the FAIL
    trials with no run), or why it cannot be had. Reads only: a missing storage is not
    created."""
    if storage is None:
        return "no Optuna storage given: runs not cross-checked against trials"
    found = optuna_storage(storage)
    if not found.exists():
        return f"Optuna storage {storage} not found: runs not cross-checked against trials"
    found.check()  # a folder, or one it cannot open: one line, not Optuna's traceback
    side = optuna_side(found.connect(), spec)
    if side.trials == 0:
        return f"Optuna storage {storage} holds no trials of this study: runs not cross-checked"
    return side
