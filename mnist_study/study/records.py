"""A study's two records must agree. Optuna's storage says what is done; MLflow mirrors
it (curves, tags, models). If one is lost or replaced, running on would redo the whole
study beside the old runs, and a report would count every seed twice: refuse instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import optuna
from mlflow.tracking import MlflowClient

from mnist_study.errors import ConfigError, SpecError, StoresDisagree
from mnist_study.study.experiment import find_experiment
from mnist_study.study.legacy import spec_from_record
from mnist_study.study.spec import StudySettings, StudySpec, Tuning, design
from mnist_study.study.tracking import Role


def study_names(spec: StudySpec, tuning: Tuning) -> tuple[str, str]:
    """A tuning's Optuna studies: its trials, and its final seeds."""
    tune = f"{spec.name}.{tuning.cell.key}" + (f".t{tuning.index}" if tuning.replicated else "")
    return tune, f"{tune}.final"


def all_study_names(spec: StudySpec) -> list[str]:
    return [name for t in spec.tunings for name in study_names(spec, t)]


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
    trials, run_ids, states, runless = 0, {}, {}, []
    for name in all_study_names(spec):
        if name not in existing:
            continue
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            trials += 1
            if "mlflow_run_id" in t.system_attrs:
                run_ids[t.system_attrs["mlflow_run_id"]] = f"{name}#{t.number}"
                states[t.system_attrs["mlflow_run_id"]] = t.state.name
            elif t.state == optuna.trial.TrialState.FAIL:
                runless.append(f"{name}#{t.number}")
    return OptunaSide(trials, run_ids, states, runless)


def open_runs_of_ended_trials(side: OptunaSide, runs: dict[str, str]) -> list[str]:
    """Run ids RUNNING in MLflow whose trial has ended (its worker wrote the trial's end
    but not the run's: a full disk, a deleted experiment, a kill in between)."""
    return [
        r
        for r, status in runs.items()
        if status == "RUNNING" and side.states.get(r, "RUNNING") != "RUNNING"
    ]


def mlflow_children(tracking_uri: str, experiment: str) -> dict[str, str] | None:
    """run id -> status of the study's tuning and final runs; None without an experiment."""
    exp = find_experiment(tracking_uri, experiment)
    if exp is None:
        return None
    found = MlflowClient(tracking_uri).search_runs(
        [exp.experiment_id], f"tags.role != '{Role.VARIANT}'", max_results=50_000
    )
    units = (Role.TUNE, Role.FINAL)
    return {r.info.run_id: r.info.status for r in found if r.data.tags["role"] in units}


def check_stores_agree(
    spec: StudySpec,
    tracking_uri: str,
    storage_url: str,
    storage: optuna.storages.BaseStorage | None,
) -> None:
    """Raise StoresDisagree (one line: which store, what to do) unless both records hold
    the same study, or neither holds it yet. `storage` None: the storage file is missing."""
    side = optuna_side(storage, spec) if storage is not None else OptunaSide(0, {})
    runs = mlflow_children(tracking_uri, spec.name) or {}
    fresh = f'or set a new name = "..." at the top of {spec.path} to start a new study'
    if runs and side.trials == 0:
        raise StoresDisagree(
            f"MLflow ({tracking_uri}) holds {len(runs)} runs of study {spec.name!r} but the "
            f"Optuna storage {storage_url} has none of its trials (deleted or replaced?); "
            f"restore {storage_url} to resume, {fresh} (running on would duplicate every run)"
        )
    missing = [r for r in side.run_ids if r not in runs]
    if missing:
        raise StoresDisagree(
            f"the Optuna storage {storage_url} holds {side.trials} trials of study "
            f"{spec.name!r} but {len(missing)} of their MLflow runs are not in {tracking_uri} "
            f"(deleted or replaced?); restore the MLflow store to resume, {fresh}"
        )
    unknown = [r for r, status in runs.items() if status == "FINISHED" and r not in side.run_ids]
    if unknown:
        raise StoresDisagree(
            f"MLflow ({tracking_uri}) holds {len(unknown)} finished runs of study "
            f"{spec.name!r} that match no trial in the Optuna storage {storage_url} (an older "
            f"or another copy of it?); restore the matching storage, {fresh}"
        )


def reconcile_runs(spec: StudySpec, storage, tracker) -> None:
    """On resume, close every run left RUNNING whose trial has ended, as its trial ended:
    Optuna's record says what is done, MLflow mirrors it. A FAIL trial's run is KILLED;
    a COMPLETE or PRUNED one's is FINISHED, since its metrics were logged before the
    trial was told (call under the claim lock)."""
    from mnist_study.study.outcome import Outcome

    by_state = {"COMPLETE": Outcome.COMPLETE, "PRUNED": Outcome.PRUNED}
    side = optuna_side(storage, spec)
    runs = mlflow_children(tracker.client.tracking_uri, spec.name) or {}
    for run_id in open_runs_of_ended_trials(side, runs):
        state = side.states[run_id]
        if state in by_state:
            tracker.end(run_id, by_state[state])
        else:
            tracker.end(run_id, Outcome.WORKER_DIED, "left RUNNING after its trial failed")


def refuse_changed_study(spec: StudySpec, recorded_text: str | None, where: str) -> str | None:
    """A study resumed under the same name must be the study that was started: a changed
    budget or search space would mix trials of two designs in one table. Raising
    study.tunings or adding study.seeds, and nothing else, extends it: the finished units
    are what a fresh run of the larger spec gives (proposals follow from the tuning's
    seed and its own trials), so they are kept. Returns that extension, said in a line."""
    if not recorded_text:
        return None
    try:
        old = spec_from_record(recorded_text, spec.path)
    except (ConfigError, ValueError):
        return None  # written by an older version of this tool: nothing to compare against
    extension = extended(old.settings, spec.settings)
    changed = [
        label
        for label, a, b in (
            ("[study]", old.settings, spec.settings),
            ("[defaults]", design(old.defaults), design(spec.defaults)),
        )
        if a != b and not (label == "[study]" and extension)
    ]
    if old.settings.tunings == 1 < spec.settings.tunings and "[study]" in changed:
        changed[changed.index("[study]")] = (
            f"[study] with study.tunings 1 -> {spec.settings.tunings}: a study tuned once "
            "names its runs without a tuning index, so it cannot gain tunings"
        )
    old_variants = {v.name: v for v in old.variants}
    changed += [  # a new description only rewords the report: not a change of design
        f"variants.{v.name}"
        for v in spec.variants
        if v.name in old_variants
        and dataclasses.replace(old_variants[v.name], description="")
        != dataclasses.replace(v, description="")
    ]
    added = [v.name for v in spec.variants if v.name not in old_variants]
    removed = sorted(set(old_variants) - {v.name for v in spec.variants})
    changed += [f"added variants.{n}" for n in added] + [f"removed variants.{n}" for n in removed]
    if changed:
        raise SpecError(
            f"{spec.path}: changed since study {spec.name!r} started in {where} "
            f"({', '.join(changed)}); restore the file to resume it (raising study.tunings "
            f"or adding study.seeds alone extends it), or set a new "
            f'name = "..." at its top to start a new study'
        )
    return extension


def extended(old: StudySettings, new: StudySettings) -> str | None:
    """'study.tunings 3 -> 8' (and/or the seeds added) where `new` only raises the
    tunings of a study tuned several times or adds final seeds; else None."""
    same = dataclasses.replace(new, tunings=old.tunings, seeds=old.seeds) == old
    grows = new.tunings >= old.tunings and set(new.seeds) >= set(old.seeds)
    if not same or not grows or new == old or (old.tunings == 1 < new.tunings):
        return None
    parts = []
    if new.tunings != old.tunings:
        parts.append(f"study.tunings {old.tunings} -> {new.tunings}")
    if set(new.seeds) != set(old.seeds):
        parts.append(f"study.seeds + {sorted(set(new.seeds) - set(old.seeds))}")
    return ", ".join(parts)
