"""MLflow bookkeeping: one experiment per study, a parent run per variant, a child run
per trial and per final seed. Everything goes through MlflowClient with explicit run
ids, so several worker processes can log into the same store without shared state.
"""

from __future__ import annotations

import enum
import logging
import tempfile
import time

import torch
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_study.study.outcome import Outcome
from mnist_study.study.provenance import mnist_inputs
from mnist_study.study.spec import Variant
from mnist_study.training.config import TrainConfig

PARENT_TAG = "mlflow.parentRunId"
# The MLflow 3 UI opens an experiment by its kind: training runs, not GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXTENDED_TAG = "mnist_study.extended"  # each accepted extension: "study.tunings 3 -> 8"
SPEC_TAG = "mnist_study.spec"  # a summary line, then the resolved spec (JSON) a study started with


class Role(enum.StrEnum):
    """A run's `role` tag: what it is to the study."""

    TUNE = "tune"  # a tuning trial
    FINAL = "final"  # a final seed, the only runs that see the test set
    VARIANT = "variant"  # a cell's parent run
    REPORT = "report"  # the study's comparison, one per study


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
    "epoch_seconds": "time/train_seconds",
    "test_acc_mean": "final/test_acc_mean",
    "test_acc_std": "final/test_acc_std",
    "n_final": "final/seeds",
    "best_val_acc": "final/best_val_acc",
}


class Tracker:
    def __init__(self, tracking_uri: str, experiment_id: str):
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = experiment_id

    def runs(self, filter_string: str):
        return self.client.search_runs([self.experiment_id], filter_string, max_results=5000)

    def parent_run(
        self, cell: Variant, cfg: TrainConfig | None = None, source: dict[str, str] | None = None
    ) -> str:
        """The cell's parent run, created once (callers hold the claim lock) with the
        data its runs read (`cfg`: the cell's configuration) and their `source` tags, so
        that the UI's Dataset and Source columns are filled for it too."""
        query = f"tags.role = '{Role.VARIANT}' and tags.variant = '{cell.name}'"
        tags = {"role": Role.VARIANT, "variant": cell.name, "mlflow.note.content": cell.description}
        if cell.train_size is not None:
            query += f" and tags.train_size = '{cell.train_size}'"
            tags |= {"cell": cell.key, "train_size": str(cell.train_size)}
        found = self.runs(query)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=cell.key, tags=tags | (source or {})
        )
        if cfg is not None:
            self.log_inputs(run.info.run_id, mnist_inputs(cfg, test=True))
        return run.info.run_id

    def trial_run(self, optuna_study: str, number: int) -> str | None:
        """The RUNNING run created for a trial, found by the tags it was created with."""
        found = self.runs(
            f"tags.optuna_study = '{optuna_study}' and tags.optuna_trial = '{number}'"
            " and attributes.status = 'RUNNING'"
        )
        return found[0].info.run_id if found else None

    def child_run(
        self, parent_id: str, name: str, cfg: TrainConfig, tags: dict[str, str], test: bool
    ) -> str:
        return self.create_run(name, cfg, {PARENT_TAG: parent_id, **tags}, test)

    def create_run(self, name: str, cfg: TrainConfig, tags: dict[str, str], test: bool) -> str:
        """A run with the full resolved configuration as params and the data it reads as
        inputs (`test`: the test set too)."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        params = [Param(k, str(v)) for k, v in cfg.as_params().items()]
        self.client.log_batch(run.info.run_id, params=params)
        self.log_inputs(run.info.run_id, mnist_inputs(cfg, test))
        return run.info.run_id

    def log_inputs(self, run_id: str, datasets: list[DatasetInput], tries: int = 3) -> None:
        """MLflow's store looks for an experiment's dataset, then inserts it: two workers
        logging a new dataset at once race, and the loser hits the unique constraint
        (SQLite and PostgreSQL, directly or behind `mlflow server`). The winner's row is
        there on the next try, which links to it."""
        for attempt in range(tries):
            try:
                return self.client.log_inputs(run_id, datasets=datasets)
            except MlflowException as e:
                if attempt == tries - 1 or "unique constraint" not in str(e).lower():
                    raise

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[
                Metric(METRIC_NAMES.get(k, k), float(v), now, step) for k, v in metrics.items()
            ],
        )

    def log_params(self, run_id: str, params: dict[str, object]) -> None:
        if params:
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def set_tags(self, run_id: str, tags: dict[str, object]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log_model(self, run_id: str, model: torch.nn.Module) -> None:
        """The trained model in MLflow's pytorch format, as the run's `model` artifact:
        mlflow.pytorch.load_model("runs:/RUN_ID/model"). Saved, then logged through this
        client: mlflow.pytorch.log_model would need MLflow's process-wide tracking URI.

        Pickle format, not the pt2 default: torch.export costs seconds per model here
        and needs an input example; the pickle needs mnist_study importable to load.
        """
        import mlflow.pytorch

        # Its warning about pickles is the trade-off stated above, once per model.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as folder:
            mlflow.pytorch.save_model(
                model.cpu().float().eval(),
                f"{folder}/model",
                serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mnist-study"],
            )
            self.client.log_artifacts(run_id, f"{folder}/model", "model")

    def end(self, run_id: str, outcome: Outcome, reason: str = "", trial: bool = True) -> None:
        """Close a run as `outcome`; a trial's run also gets the Optuna state it mirrors."""
        tags = {"outcome": outcome.value[0]}
        if trial:
            tags["optuna_state"] = outcome.trial_state.name
        if reason:
            key = "prune_reason" if outcome.trial_state.name == "PRUNED" else "fail_reason"
            tags[key] = reason[:500]
        self.set_tags(run_id, tags)
        self.finish(run_id, outcome.run_status)
