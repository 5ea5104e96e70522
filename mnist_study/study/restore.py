"""A study's published tunings restored into new stores (`run --restore`), so that a
study whose stores were lost with their machine runs on from the rounds its page
published (docs/data/STUDY-runs.csv) instead of from its first. Each tuning the file
holds whole enters Optuna's record as its trials and final seeds ended, so the ledger
counts it done and no worker runs it again; the rows restored are kept as artifacts of
one MLflow run, which the report reads back beside the study's own runs. A tuning's
trials depend on its index alone (its sampler seed), so the tunings left to run are
the ones the lost stores would have run."""

from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState, create_trial

from mnist_study.errors import ConfigError
from mnist_study.study.ledger import DONE, TuningLedger
from mnist_study.study.scheduler import distributions
from mnist_study.study.spec import EXECUTION_FIELDS, StudySpec, Tuning
from mnist_study.study.stores import StudyStores
from mnist_study.tracking.names import RESTORED_ATTR
from mnist_study.tracking.restored_run import log_restored
from mnist_study.training.config import TrainConfig

ROW_ATTR = "restored_row"  # a restored trial's user attribute: its row in the file
ENDED = {state.name: state for state in DONE}
"""The states of the rows written as trials, the ledger's done ones by name (a failed run
stays a row the report reads)."""


def curves_file(runs_csv: Path) -> Path:
    """The curves file a page publishes beside its runs file."""
    return runs_csv.with_name(runs_csv.name.removesuffix("-runs.csv") + "-curves.csv")


@dataclass(frozen=True)
class Published:
    """A page's raw runs, every value as its text (written back as read)."""

    path: Path
    sha256: str
    runs: pd.DataFrame
    curves: pd.DataFrame | None
    hyperparameters: list[str]
    """The columns that hold a run's configuration (the others say what it measured)."""

    @classmethod
    def read(cls, path: Path, hyperparameters: list[str]) -> Published:
        """The file (checked by the caller as one the report reads) and its curves."""
        data, curves = path.read_bytes(), curves_file(path)
        return cls(
            path,
            hashlib.sha256(data).hexdigest(),
            pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False),
            pd.read_csv(curves, dtype=str, keep_default_na=False) if curves.exists() else None,
            hyperparameters,
        )


@dataclass(frozen=True)
class Restoring:
    """What a restore writes: per tuning held whole, its ended trials and final seeds,
    as the ledger will read them once written."""

    published: Published
    tunings: list[TuningLedger]
    rows: pd.Index
    """Every row of those tunings (failed runs too): the rows the report reads back."""
    lines: list[str]


def plan_restore(spec: StudySpec, published: Published) -> Restoring:
    """The file's tunings checked against the spec before anything is written: each of
    its runs is a tuning of this spec with this design (else ConfigError, one line);
    a tuning held in part is left to run, in a line."""
    try:
        return tunings_of(spec, published)
    except ConfigError:
        raise
    except ValueError as exc:  # a number that is not one, in a file edited by hand
        raise ConfigError(
            f"{published.path}: {exc}; give a file that report --page wrote"
        ) from None


def tunings_of(spec: StudySpec, published: Published) -> Restoring:
    path, s = published.path, spec.settings
    planned = {(t.cell.name, t.cell.train_size, t.index): t for t in spec.tunings}
    runs = published.runs
    whole, rows, partial = [], [], []
    for (variant, size, index), mine in runs.groupby(["variant", "train_size", "tuning"]):
        key = (variant, int(size) if s.train_sizes else None, int(index))
        tuning = planned.get(key)
        if tuning is None:
            variants = ", ".join(v.name for v in spec.variants)
            raise ConfigError(
                f"{path}: tuning {index} of {variant} (train_size {size}) is not one that "
                f"{spec.path} plans ({s.tunings} tunings of {variants}); restore a file of "
                f"this study, or raise study.tunings"
            )
        trials = mine[(mine.role == "tune") & mine.state.isin(ENDED)]
        finals = mine[(mine.role == "final") & (mine.state == "COMPLETE")]
        for i, row in pd.concat([trials, finals]).iterrows():
            where = f"{path}: row {i + 2} ({tuning.key})"
            check_design(spec, tuning, row[published.hyperparameters], where)
        made = [as_trials(tuning, rows, published.sha256) for rows in (trials, finals)]
        ledger = TuningLedger(tuning, *made, s.trials, s.seeds)
        if len(ledger.done_trials) > s.trials or len(ledger.seeds_done) < len(finals):
            raise ConfigError(
                f"{path}: {tuning.key} holds {len(trials)} ended trials and final seeds "
                f"{sorted(finals.seed.astype(int))}; {spec.path} gives a tuning {s.trials} "
                f"trials and seeds {list(s.seeds)}: not a tuning of this design"
            )
        if not ledger.finished:
            partial.append(tuning.key)
            continue
        whole.append(ledger)
        rows.append(mine.index)
    lines = [f"{path}: {len(partial)} tuning(s) held in part, left to run: {', '.join(partial)}"]
    index = rows[0].append(rows[1:]) if rows else pd.Index([])
    return Restoring(published, whole, index, lines if partial else [])


def check_design(spec: StudySpec, tuning: Tuning, row: pd.Series, where: str) -> None:
    """The row (its hyperparameters) ran the spec's configuration of its cell at its
    tuned point, every searched value within the spec's range; execution fields may
    differ."""
    cell = tuning.cell
    for key, r in cell.search.items():
        if not r.low <= float(row[key]) <= r.high:
            raise ConfigError(
                f"{where}: {key} {row[key]} is outside {spec.path}'s search range "
                f"[{r.low}, {r.high}]: not a run of this design"
            )
    cfg = spec.config_for(cell, {k: cast(k, row[k]) for k in cell.search})
    for key, value in cfg.as_params().items():
        if key in EXECUTION_FIELDS or key in cell.search or key not in row:
            continue
        same = str(value) == row[key] if isinstance(value, bool | str) else None
        if same is None:
            same = value is not None and row[key] != "" and float(row[key]) == float(value)
        if not same:
            raise ConfigError(
                f"{where}: {key} {row[key]!r}, but {spec.path} gives {cell.key} {value!r}: "
                f"not a run of this design"
            )


def check_restorable(stores: StudyStores, restoring: Restoring) -> None:
    """Refuse, before anything is written, stores that hold runs of their own in a
    tuning to restore (the file's own restored trials, from an interrupted or repeated
    restore, are fine: a rerun completes them)."""
    if not stores.optuna.exists() or not restoring.tunings:
        return
    tune, final = stores.load_studies(stores.optuna.open(), created_only=True)
    for tuning in (t.tuning for t in restoring.tunings):
        for study in (s[tuning.key] for s in (tune, final) if tuning.key in s):
            trials = study.get_trials(deepcopy=False)
            if any(t.user_attrs.get(RESTORED_ATTR) != restoring.published.sha256 for t in trials):
                raise ConfigError(
                    f"--restore {restoring.published.path}: the Optuna storage "
                    f"{stores.optuna.url} already holds trials of {tuning.key} that this file "
                    f"did not restore; restore into new stores (--storage, --tracking-uri), "
                    f"or run without --restore"
                )


def restore(stores: StudyStores, restoring: Restoring, command: str) -> tuple[list[str], int]:
    """Write the restore (after create and attach, under the claim lock): the rows kept
    in MLflow first, then each trial not restored yet into Optuna's record. Returns its
    lines and the trials (each a unit done) written now."""
    published, added = restoring.published, 0
    if not restoring.tunings:
        return restoring.lines + [f"{published.path}: no tuning held whole; nothing restored"], 0
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / published.path.name]
        files[0].write_text(published.runs.loc[restoring.rows].to_csv(index=False), "utf-8")
        if published.curves is not None:
            files.append(Path(tmp) / curves_file(published.path).name)
            files[1].write_text(restored_curves(restoring).to_csv(index=False), "utf-8")
        log_restored(
            stores.tracking_uri, stores.tracker.experiment_id, files, published.sha256,
            restored_note(restoring), command,
        )  # fmt: skip
    for ledger in restoring.tunings:
        added += add_trials(stores.tune[ledger.tuning.key], ledger.trials)
        added += add_trials(stores.final[ledger.tuning.key], ledger.finals)
    return restoring.lines + [
        f"{restored_note(restoring)}: {added} trial(s) written to Optuna's record now"
    ], added


def restored_curves(restoring: Restoring) -> pd.DataFrame:
    curves = restoring.published.curves
    keys = {
        (t.tuning.cell.name, t.tuning.cell.train_size, t.tuning.index) for t in restoring.tunings
    }
    sized = restoring.tunings[0].tuning.cell.train_size is not None
    held = [
        (v, int(n) if sized else None, int(i)) in keys
        for v, n, i in zip(curves.variant, curves.train_size, curves.tuning, strict=True)
    ]
    return curves[held]


def restored_note(restoring: Restoring) -> str:
    tunings = restoring.tunings
    indices = sorted({t.tuning.index for t in tunings})
    run = indices == list(range(indices[0], indices[-1] + 1))
    shown = f"{indices[0]}-{indices[-1]}" if run else ", ".join(map(str, indices))
    return (
        f"restored from {restoring.published.path} (sha256 "
        f"{restoring.published.sha256[:12]}): {len(tunings)} tunings (indices {shown}), "
        f"{len(restoring.rows)} runs"
    )


def as_trials(tuning: Tuning, rows: pd.DataFrame, sha256: str) -> tuple[FrozenTrial, ...]:
    """The rows (each ended) as the trials a restore writes, each marked with its row;
    a tuning trial keeps its slot, which breaks ties for the best as the study's own."""
    dists, out = distributions(tuning.cell), []
    for slot, (i, row) in enumerate(rows.iterrows()):
        attrs = {RESTORED_ATTR: sha256, ROW_ATTR: int(i)}
        state = ENDED[row.state]
        if row.role == "final":
            attrs |= {"seed": int(row.seed), "test_acc": float(row.test_acc)}
            params, dists_used = {}, {}
        else:
            attrs |= {"slot": slot}
            params = {k: cast(k, row[k]) for k in dists}
            dists_used = dists
        value = float(row.val_acc) if state == TrialState.COMPLETE else None
        out.append(
            create_trial(
                state=state, value=value, params=params, distributions=dists_used,
                user_attrs=attrs,
            )
        )  # fmt: skip
    return tuple(out)


def add_trials(study: optuna.Study, trials: tuple[FrozenTrial, ...]) -> int:
    """The trials `study` does not hold yet (by row), added; returns how many."""
    present = {t.user_attrs.get(ROW_ATTR) for t in study.get_trials(deepcopy=False)}
    fresh = [t for t in trials if t.user_attrs[ROW_ATTR] not in present]
    for trial in fresh:
        study.add_trial(trial)
    return len(fresh)


def cast(key: str, text: str) -> float | int:
    return int(text) if TrainConfig.model_fields[key].annotation is int else float(text)
