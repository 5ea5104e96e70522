"""Runs in MLflow: a study's parent run per cell and child run per trial and per final
seed (or a run of `mnist-study train`), found, written and ended by id, each tagged with
what made it (the command and commit as MLflow's source tags, versions, device, machine,
and the data it read as MLflow datasets with the files' MD5s). Everything goes through
MlflowClient with explicit run ids, so several worker processes can log into the same
store without shared state.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.metadata
import logging
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import torch
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_study.tracking.names import METRIC_NAMES, NOTE_TAG, PARENT_TAG, Role
from mnist_study.tracking.outcome import Outcome
from mnist_study.training.config import MNIST_TEST_IMAGES, TrainConfig
from mnist_study.training.machine import cpu_model
from mnist_study.training.mnist_data import checksums
from mnist_study.training.train import resolve_device, thread_count

# Free bytes below which a model that torch failed to write is taken for a full disk
# (the model is ~0.5 MB; torch reports any failed write as a RuntimeError).
FULL_BELOW = 16 << 20


class Tracker:
    def __init__(self, tracking_uri: str, experiment_id: str):
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = experiment_id

    def experiment_tag(self, key: str) -> str | None:
        return self.client.get_experiment(self.experiment_id).tags.get(key)

    def set_experiment_tag(self, key: str, value: str) -> None:
        self.client.set_experiment_tag(self.experiment_id, key, value)

    def runs(self, filter_string: str):
        return self.client.search_runs([self.experiment_id], filter_string, max_results=5000)

    def parent_run(
        self,
        name: str,
        variant: str,
        train_size: int | None,
        description: str = "",
        cfg: TrainConfig | None = None,
        command: str = "",
    ) -> str:
        """The parent run of a cell (`variant`, at `train_size` in a sweep), created once
        (callers hold the claim lock) with the data its runs read (`cfg`: the cell's
        configuration) and their source tags (the `command` that runs them), so that the
        UI's Dataset and Source columns are filled for it too."""
        query = f"tags.role = '{Role.VARIANT}' and tags.variant = '{variant}'"
        tags = {"role": Role.VARIANT, "variant": variant, NOTE_TAG: description}
        if train_size is not None:
            query += f" and tags.train_size = '{train_size}'"
            tags |= {"cell": name, "train_size": str(train_size)}
        found = self.runs(query)
        if found:
            if found[0].info.status == "KILLED":  # stopped with its study, now resumed
                self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        if cfg is not None:
            tags |= {k: v for k, v in provenance(cfg, command).items() if k.startswith("mlflow.")}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
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

    def create_run(
        self,
        name: str,
        cfg: TrainConfig,
        tags: dict[str, object],
        test: bool,
        command: str,
        parent_id: str | None = None,
    ) -> str:
        """A run with `tags` and what made it (the `command` that runs it), the full
        resolved configuration as params and the data it reads as inputs (`test`: the
        test set too); a child of `parent_id` if given."""
        tags = {k: str(v) for k, v in tags.items()} | provenance(cfg, command)
        if parent_id is not None:
            tags[PARENT_TAG] = parent_id
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

    def stop_parents(self, busy: set[str]) -> None:
        """End the parent runs still RUNNING as KILLED (stopped), but those of `busy`
        cells (named as their runs are), which another command still works on; a
        cell's next unit reopens its run."""
        for run in self.runs(f"tags.role = '{Role.VARIANT}' and attributes.status = 'RUNNING'"):
            if run.info.run_name not in busy:
                self.finish(run.info.run_id, "KILLED")

    def log_model(self, run_id: str, model: torch.nn.Module) -> None:
        """The trained model in MLflow's pytorch format, as a logged model named `model`
        that the run lists (its page's "Logged models", the experiment's Models tab):
        mlflow.pytorch.load_model("runs:/RUN_ID/model"). Saved, then logged through this
        client, as mlflow.pytorch.log_model does through MLflow's process-wide tracking
        URI, which a study does not set.

        Pickle format, not the pt2 default: torch.export costs seconds per model here
        and needs an input example; the pickle needs mnist_study importable to load.
        """
        import mlflow.pytorch

        # Its warning about pickles is the trade-off stated above, once per model.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as folder:
            try:
                mlflow.pytorch.save_model(
                    model.cpu().float().eval(),
                    f"{folder}/model",
                    serialization_format="pickle",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mnist-study"],
                )
            except RuntimeError:  # torch says a failed write so; a full disk is not our bug
                if shutil.disk_usage(folder).free >= FULL_BELOW:
                    raise
                where = tempfile.gettempdir()
                raise OSError(errno.ENOSPC, "no space left for the model", where) from None
            logged = self.client.create_logged_model(
                self.experiment_id, name="model", source_run_id=run_id
            )
            self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            self.client.log_model_artifacts(logged.model_id, f"{folder}/model")
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)

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


# Where the MNIST files come from; ours are byte-identical (their MD5s are checked).
MNIST_ORIGIN = "http://yann.lecun.com/exdb/mnist/"
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


PACKAGE_REPO = Path(__file__).resolve().parents[2]


def git(*args: str, repo: Path = PACKAGE_REPO) -> str:
    """A git command's output in the package's repository (or in `repo`)."""
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout


@functools.cache
def git_commit() -> str:
    """HEAD's commit, with `-dirty` when tracked files differ from it."""
    try:
        commit = git("rev-parse", "HEAD").strip()
        return commit + ("-dirty" if git("diff", "HEAD", "--stat") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(cfg: TrainConfig, source: str) -> dict[str, str]:
    """Tags saying what made a run: MLflow's own source tags (shown by its UI), the dirty
    flag beside them in git_commit, versions, device, and the data's checksums."""
    commit = git_commit()
    tags = {
        "mlflow.source.name": source,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
        "git_commit": commit,
        "torch_version": torch.__version__,
        # Its version from the package metadata: importing torchvision costs seconds
        # (it pulls in torch._dynamo), in every worker, and nothing here uses it.
        "torchvision_version": importlib.metadata.version("torchvision"),
        "optuna_version": optuna.__version__,
        "mlflow_version": mlflow.__version__,
        "device": str(resolve_device(cfg)),
        "precision": cfg.precision,
        "threads": str(thread_count(cfg)),
        "host": platform.node(),
        "cpu": cpu_model(),
    }
    tags |= {f"mnist_md5.{name}": md5 for name, md5 in checksums().items()}
    return tags


def mnist_inputs(cfg: TrainConfig, test: bool) -> list[DatasetInput]:
    """MNIST as MLflow datasets, one per context (train, validation, and test on final
    runs), each with a digest of the files' MD5s and the split that cut it."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    md5 = checksums()
    split = f"val_size={cfg.val_size},split_seed={cfg.split_seed}"

    def dataset(context: str, name: str, files: tuple[str, ...], cut: str) -> DatasetInput:
        digest = hashlib.sha256(",".join([*(md5[f] for f in files), cut]).encode())
        meta = MetaDataset(HTTPDatasetSource(MNIST_ORIGIN), name, digest.hexdigest()[:20])
        return DatasetInput(meta._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])

    out = [
        dataset(
            "train", f"mnist-train-{cfg.train_size}", TRAIN_FILES, f"{split},n={cfg.train_size}"
        ),
        dataset("validation", f"mnist-validation-{cfg.val_size}", TRAIN_FILES, split),
    ]
    if test:  # the whole test set's digest as before subsets of it could be scored
        cut = "test" if cfg.test_size == MNIST_TEST_IMAGES else f"test,n={cfg.test_size}"
        out.append(dataset("test", f"mnist-test-{cfg.test_size}", TEST_FILES, cut))
    return out
