"""A study's raw runs, published beside its page (docs/data/STUDY-runs.csv and
STUDY-curves.csv): one row per run the report counts (every tuning trial and final
seed) and one per point of each final run's curves. Anyone can recompute the page from
them without the stores, which do not outlive their machines; `report --runs` does, and
a study restored from them (`run --restore`) is read with them."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pandas as pd

from mnist_study.analysis.collect import StudyData, collect, stage
from mnist_study.errors import ConfigError
from mnist_study.files import write_atomic
from mnist_study.study.restore import curves_file
from mnist_study.study.spec import StudySpec
from mnist_study.tracking.legacy import metric_history
from mnist_study.tracking.names import Role
from mnist_study.tracking.restored_run import restored_files
from mnist_study.tracking.store import find_experiment
from mnist_study.training.config import TrainConfig

# Each CSV column and the column of the runs frame (collect) it holds, in the CSV's order;
# the hyperparameters (every TrainConfig field) come after `outcome`, the params they were.
IDENTITY = {
    "variant": "tags.variant",
    "train_size": "train_size",
    "tuning": "tuning",
    "role": "tags.role",
    "trial": "tags.optuna_trial",
    "seed": "tags.seed",
    "state": "tags.optuna_state",
    "status": "status",
    "outcome": "tags.outcome",
}
MEASURED = {
    "val_acc": "metrics.val_acc",
    "train_acc": "metrics.train_acc",
    "test_acc": "metrics.test_acc",
    "val_loss": "metrics.val_loss",
    "train_loss": "metrics.train_loss",
    "steps": "metrics.optimizer_steps",
    "start_time": "start_time",
    "end_time": "end_time",
    "commit": "tags.git_commit",
    "cpu": "tags.cpu",
    "threads": "tags.threads",
    "workers": "tags.workers",
    "device": "tags.device",
    "command": "tags.mlflow.source.name",
    "run_id": "run_id",
    "cell": "cell",
}
HYPERPARAMETERS = [k for k in TrainConfig.model_fields if k not in IDENTITY | MEASURED]
NUMERIC = [c for c, frame in (IDENTITY | MEASURED).items() if frame.startswith("metrics.")]
CURVE_COLUMNS = ["variant", "train_size", "tuning", "seed", "point", "metric", "value"]


def data_files(page: Path, study: str) -> tuple[Path, Path]:
    """Where a page's raw runs and curves go: data/ beside the page."""
    folder = page.parent / "data"
    return folder / f"{study}-runs.csv", folder / f"{study}-curves.csv"


def runs_table(data: StudyData, tracking_uri: str) -> pd.DataFrame:
    """The published rows: every tuning trial and final seed the report counts, with its
    hyperparameters, last and best validation accuracy (the best read from its curve),
    train and test accuracy, optimizer steps, wall seconds and where it ran."""
    runs = data.runs[data.runs["tags.role"].isin([Role.TUNE, Role.FINAL])]
    out = pd.DataFrame({"study": data.name}, index=runs.index)
    for name, column in IDENTITY.items():
        out[name] = runs.get(column)
    for name in HYPERPARAMETERS:
        out[name] = runs.get(f"params.{name}")
    for name, column in MEASURED.items():
        out[name] = runs.get(column)
    out.insert(out.columns.get_loc("train_acc"), "best_val_acc", best_val_accs(runs, tracking_uri))
    out.insert(
        out.columns.get_loc("start_time"),
        "seconds",
        (runs.end_time - runs.start_time).dt.total_seconds(),
    )
    for name in ("train_size", "tuning"):
        out[name] = out[name].astype("Int64")
    return out.sort_values(["train_size", "tuning", "variant", "role", "trial", "seed"])


def best_val_accs(runs: pd.DataFrame, tracking_uri: str) -> list[float]:
    """Each run's best validation accuracy over its evaluation points (a restored run's
    as its file gave it: its curve is not in this store)."""
    given = runs.get("best_val_acc", pd.Series(math.nan, index=runs.index))
    return [
        best
        if pd.notna(best)
        else max(
            (m.value for m in metric_history(tracking_uri, run_id, "val_acc")), default=math.nan
        )
        for run_id, best in zip(runs.run_id, given, strict=True)
    ]


def write_raw(data: StudyData, tracking_uri: str, page: Path) -> tuple[Path, Path]:
    """The study's raw runs and final curves beside `page`, each written whole."""
    runs_csv, curves_csv = data_files(page, data.name)
    write_atomic(runs_csv, runs_table(data, tracking_uri).to_csv(index=False))
    curves = data.curves.astype({"train_size": "Int64"})
    write_atomic(curves_csv, curves[CURVE_COLUMNS].to_csv(index=False))
    return runs_csv, curves_csv


def read_raw(runs_csv: Path, spec: StudySpec, tunings: int | None = None) -> StudyData:
    """The study as its report reads it, from its published CSVs alone (no store): the
    runs frame collect() would give, and the final runs' curves where the curves file is
    beside it. A file that is not such a table is refused in one line."""
    runs = read_csv(runs_csv, ["study", *IDENTITY, *MEASURED])
    if set(runs.study) != {spec.name}:
        raise ConfigError(
            f"{runs_csv}: holds the runs of {sorted(set(runs.study))}, not of study "
            f"{spec.name!r}; give the study that wrote it"
        )
    frame = pd.DataFrame(index=runs.index)
    for name, column in (IDENTITY | MEASURED).items():
        frame[column] = runs[name]
    for name in HYPERPARAMETERS:
        if name in runs:
            frame[f"params.{name}"] = runs[name]
    for name in [*NUMERIC, "train_size", "tuning", "best_val_acc"]:
        if name in runs:
            frame[(IDENTITY | MEASURED).get(name, name)] = numbers(runs_csv, runs, name)
    for name in ("start_time", "end_time"):
        frame[name] = pd.to_datetime(runs[name], utc=True, format="ISO8601")
    frame["tags.tuning"] = runs["tuning"]  # as MLflow keeps it, a string
    curves_csv = curves_file(runs_csv)
    curves = pd.DataFrame(columns=CURVE_COLUMNS)
    if curves_csv.exists():
        curves = read_csv(curves_csv, CURVE_COLUMNS)
        for name in ("train_size", "tuning", "seed", "point", "value"):
            curves[name] = numbers(curves_csv, curves, name)
        try:
            curves = curves.astype({"train_size": float, "tuning": int, "seed": int, "point": int})
        except ValueError as exc:  # an empty cell where a whole number belongs
            raise ConfigError(
                f"{curves_csv}: {exc}; give a file that report --page wrote"
            ) from None
    variants = [v.name for v in spec.variants]
    found = [] if curves_csv.exists() else [f"{curves_csv} not found: gaps and curves left out"]
    data = StudyData(spec.name, spec, frame, curves, variants, found)
    return stage(data, tunings)


def read_study(
    tracking_uri: str, study: str, storage: str | None = None, tunings: int | None = None
) -> StudyData:
    """The study from its stores (collect), with the tunings `run --restore` restored in
    them from a page's raw runs read back as `report --runs` reads them; with
    `tunings`, every cell's first `tunings` alone."""
    data = collect(tracking_uri, study, storage)
    found = find_experiment(tracking_uri, study) if data.spec else None
    if found is None:
        return stage(data, tunings)
    with tempfile.TemporaryDirectory() as tmp:
        restored = restored_files(tracking_uri, found.experiment_id, Path(tmp))
        parts = [read_raw(runs_csv, data.spec) for _, runs_csv in restored]
    if parts:
        own = data.runs[data.runs["tags.role"] != Role.RESTORED]
        data = dataclasses.replace(
            data,
            runs=joined([p.runs for p in parts] + [own]),
            curves=joined([p.curves for p in parts] + [data.curves]),
            problems=[x for p in parts for x in p.problems] + data.problems,
            restored="; ".join(note for note, _ in restored),
        )
    return stage(data, tunings)


def numbers(path: Path, table: pd.DataFrame, column: str) -> pd.Series:
    """A column of numbers, or a one-line refusal naming the file, column and value."""
    try:
        return pd.to_numeric(table[column])
    except ValueError as exc:
        raise ConfigError(
            f"{path}: column {column}: {exc}; give a file that report --page wrote"
        ) from None


def joined(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames one after another; an empty one (no run of its own yet) adds nothing,
    not even a column of unknown type."""
    return pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A published CSV, every value as its text (tags and params are text in MLflow)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give a STUDY-runs.csv that report --page wrote")
    try:
        table = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a CSV table ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in table]
    if missing:
        raise ConfigError(
            f"{path}: no column(s) {', '.join(missing)}; give a file that report --page wrote"
        )
    return table
