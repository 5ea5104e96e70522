"""The names a study writes into MLflow and reads back: run roles, metric names, tag
keys, and links into MLflow's UI. Free of MLflow, so that anything may import them."""

from __future__ import annotations

import enum
import json

PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's or an experiment's description (Markdown)
# The MLflow 3 UI opens an experiment by its kind: training runs, not GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXTENDED_TAG = "mnist_study.extended"  # each accepted extension: "study.tunings 3 -> 8"
SPEC_TAG = "mnist_study.spec"  # a summary line, then the resolved spec (JSON) a study started with
IDENTITY_TAG = "mnist_study.identity"  # JSON: the code, threads, device kind and data it runs on
MIXED_TAG = "mnist_study.mixed"  # each mix allowed on a resume: "threads 1 -> 2"
ROUNDS_TAG = "mnist_study.rounds_finished"  # the last round its workers said was finished
RESTORED_ATTR = "restored_from"  # a restored trial's user attribute: its raw runs' sha256
# A saved view of the runs table (MLflow 3.15+), kept as an experiment tag under a key
# that a link names: the table a study's links open (see cells_view).
VIEW_KEY = "cells"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"


class Role(enum.StrEnum):
    """A run's `role` tag: what it is to the study."""

    TUNE = "tune"  # a tuning trial
    FINAL = "final"  # a final seed, the only runs that see the test set
    VARIANT = "variant"  # a cell's parent run
    REPORT = "report"  # the study's comparison, one per study
    TRAIN = "train"  # a run of `mnist-study train --mlflow`, no study's
    RESTORED = "restored"  # tunings restored from published raw runs (run --restore)


# MLflow's UI groups a run's charts by the prefix before '/': accuracy and loss each
# get a section with train, validation (and test) side by side. Code and history dicts
# use the short names; these are the names in MLflow, written and read only through here.
METRIC_NAMES = {
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/validation",
    "test_acc": "accuracy/test",
    "train_loss": "loss/train",
    "train_loss_running": "loss/train_running",
    "val_loss": "loss/validation",
    "test_loss": "loss/test",
    "lr": "optimizer/lr",
    "optimizer_steps": "optimizer/steps",
    "train_seconds": "time/train_seconds",
    # A cell's parent run, in percent, named so that MLflow's table (which orders
    # columns by name) reads mean, then its 95% interval's lower and upper end.
    "test_acc_mean": "test_acc_mean",
    "test_acc_low": "test_acc_mean_lo95",
    "test_acc_high": "test_acc_mean_up95",
    "test_acc_std": "test_acc_sd",
    "n_final": "seeds",
    "best_val_acc": "best_val_acc",
}

# MLflow 3.x's UI opens a bare experiment or run link in its GenAI mode whatever the
# experiment's tags; this query keeps it in Model-training mode (checked in Chromium).
MODEL_TRAINING = "workflowType=machine_learning"


def ui_link(experiment_id: str, page: str = "runs", ui: str = "", view: bool = False) -> str:
    """A page of an experiment in MLflow's UI, in Model-training mode: its runs table
    (with `view`, as the study's saved view shows it), or `page` (`runs/RUN_ID`, ...);
    relative (for a description) unless `ui` is given."""
    base = f"{ui.rstrip('/')}/" if ui else ""
    shown = f"&viewStateShareKey={VIEW_KEY}" if view else ""
    return f"{base}#/experiments/{experiment_id}/{page}?{MODEL_TRAINING}{shown}"


def cells_view(tuned: list[str]) -> str:
    """The saved view a study's link opens, as MLflow's UI reads it (JSON): each cell's
    parent run, best first, with its mean test accuracy (%) over the final seeds and the
    report's 95% interval of it, the seed count, the best validation accuracy and the
    tuned hyperparameters (`tuned`, the parent's param names). Without it the table
    shows Created, Dataset, Duration, Source and Models, and the numbers only under
    Columns."""
    mean = f"metrics.`{METRIC_NAMES['test_acc_mean']}`"
    shown = ("test_acc_mean", "test_acc_low", "test_acc_high", "n_final", "best_val_acc")
    columns = [f"metrics.`{METRIC_NAMES[m]}`" for m in shown] + [f"params.`{p}`" for p in tuned]
    view = {
        "searchFilter": f"tags.role = '{Role.VARIANT}'",
        "orderByKey": mean,
        "orderByAsc": False,
        "selectedColumns": columns,
    }
    return json.dumps(view)
