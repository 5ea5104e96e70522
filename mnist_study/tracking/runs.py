"""A study's runs in MLflow: a parent run per cell, a child run per trial and per final
seed, found, written and ended by id. Everything goes through MlflowClient with explicit
run ids, so several worker processes can log into the same store without shared state.
"""

from __future__ import annotations

import logging
import tempfile
import time

import pandas as pd
import torch
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_study.tracking.names import METRIC_NAMES, NOTE_TAG, PARENT_TAG, Role
from mnist_study.tracking.outcome import Outcome
from mnist_study.tracking.provenance import mnist_inputs
from mnist_study.training.config import TrainConfig


class Tracker:
    def __init__(self, tracking_uri: str, experiment_id: str):
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = experiment_id

    def runs(self, filter_string: str):
        return self.client.search_runs([self.experiment_id], filter_string, max_results=5000)

    def parent_run(
        self,
        name: str,
        variant: str,
        train_size: int | None,
        description: str = "",
        cfg: TrainConfig | None = None,
        source: dict[str, str] | None = None,
    ) -> str:
        """The parent run of a cell (`variant`, at `train_size` in a sweep), created once
        (callers hold the claim lock) with the data its runs read (`cfg`: the cell's
        configuration) and their `source` tags, so that the UI's Dataset and Source
        columns are filled for it too."""
        query = f"tags.role = '{Role.VARIANT}' and tags.variant = '{variant}'"
        tags = {"role": Role.VARIANT, "variant": variant, NOTE_TAG: description}
        if train_size is not None:
            query += f" and tags.train_size = '{train_size}'"
            tags |= {"cell": name, "train_size": str(train_size)}
        found = self.runs(query)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags | (source or {}))
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

    def status_and_metric(self, run_id: str, metric: str) -> tuple[str, float | None]:
        """A run's status and the last value of one of its metrics (its MLflow name)."""
        run = self.client.get_run(run_id)
        return run.info.status, run.data.metrics.get(metric)

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


def unit_runs(tracking_uri: str, experiment_id: str) -> dict[str, str]:
    """run id -> status of a study's tuning and final runs."""
    found = MlflowClient(tracking_uri).search_runs(
        [experiment_id], f"tags.role != '{Role.VARIANT}'", max_results=50_000
    )
    units = (Role.TUNE, Role.FINAL)
    return {r.info.run_id: r.info.status for r in found if r.data.tags["role"] in units}


def runs_frame(tracking_uri: str, experiment_id: str) -> pd.DataFrame:
    """The experiment's runs, one row each, in mlflow.search_runs' columns (run_id,
    status, start_time, end_time, metrics.*, params.*, tags.*), read through `client`:
    mlflow.search_runs reads MLflow's process-wide tracking URI."""
    client = MlflowClient(tracking_uri)
    rows, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=10_000, page_token=token)
        for run in page:
            info, data = run.info, run.data
            rows.append(
                {
                    "run_id": info.run_id,
                    "experiment_id": info.experiment_id,
                    "status": info.status,
                    "artifact_uri": info.artifact_uri,
                    "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
                    "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True),
                    **{f"metrics.{k}": v for k, v in data.metrics.items()},
                    **{f"params.{k}": v for k, v in data.params.items()},
                    **{f"tags.{k}": v for k, v in data.tags.items()},
                }
            )
        token = page.token
        if not token:
            return pd.DataFrame(rows)
