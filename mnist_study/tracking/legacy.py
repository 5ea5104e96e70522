"""Records written by older versions of mnist-study, read as today's. Each fallback says
which records need it; nothing else in the package knows the old forms.
"""

from __future__ import annotations

import functools

import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mnist_study.tracking.names import METRIC_NAMES, NOTE_TAG, SPEC_TAG


def recorded_spec_text(tags: dict[str, str]) -> str | None:
    """The spec an experiment recorded when its study started: the resolved JSON on its
    spec tag's last line (the first is a summary for MLflow's experiment list). Older
    experiments: the tag held the JSON alone; before the tag, the description held the
    spec file's TOML."""
    value = tags.get(SPEC_TAG)
    return value.rpartition("\n")[2] if value else tags.get(NOTE_TAG)


@functools.cache  # a report reads every final run's curves: one client, not one a call
def client_of(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri)


# Short names renamed since runs recorded them under those names (before the grouped
# names): today's name -> the old one.
RENAMED = {"train_seconds": "epoch_seconds"}


def metric_history(tracking_uri: str, run_id: str, name: str) -> list[Metric]:
    """A metric's history under its MLflow name, or the short name that runs recorded
    before the names were grouped."""
    client = client_of(tracking_uri)
    return client.get_metric_history(run_id, METRIC_NAMES.get(name, name)) or (
        client.get_metric_history(run_id, RENAMED.get(name, name)) if name in METRIC_NAMES else []
    )


def column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A tag or param column; all missing when no run has it."""
    return runs[name] if name in runs else pd.Series(None, index=runs.index, dtype=object)


def upgrade_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs as today's code reads them, in place: metrics under their short names
    (`metrics.val_acc`), and the cell, tuning and training-set size of each run."""
    for short, name in METRIC_NAMES.items():  # runs from before the grouped names
        new, old = (
            pd.to_numeric(column(runs, f"metrics.{n}"), errors="coerce")
            for n in (name, RENAMED.get(short, short))
        )
        runs[f"metrics.{short}"] = new.fillna(old)
    # Runs from before sweeps have no cell tag: their cell is their variant.
    runs["cell"] = column(runs, "tags.cell").fillna(runs["tags.variant"])
    # Runs from before tuning replicates have no tag: they are the one tuning, 0.
    runs["tuning"] = pd.to_numeric(column(runs, "tags.tuning"), errors="coerce").fillna(0)
    # A sweep's runs are told apart by size; params cover children from before the tag.
    size = column(runs, "tags.train_size").fillna(column(runs, "params.train_size"))
    runs["train_size"] = pd.to_numeric(size, errors="coerce")
    return runs


def recorded_command(runs: pd.DataFrame, study: str, workers: str) -> str:
    """`Command: ...`: the command the runs record as their source (with their stores),
    each with its count of runs where several shared the study; for runs from before
    they recorded it, the spec's usual one."""
    sources = runs.get("tags.mlflow.source.name", pd.Series(dtype=object)).dropna()
    counts = sources[sources.str.contains("--workers")].value_counts()
    if len(counts) > 1:
        return "Commands: " + ", ".join(f"`{c}` ({n} runs)" for c, n in counts.items())
    command = (
        counts.index[0]
        if len(counts)
        else f"mnist-study run experiments/{study}.toml --workers {workers}"
    )
    return f"Command: `{command}`"
