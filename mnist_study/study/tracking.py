"""MLflow bookkeeping: one experiment per study, a parent run per variant, a child run
per trial and per final seed. Everything goes through MlflowClient with explicit run
ids, so several worker processes can log into the same store without shared state.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import platform
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_study.errors import ConfigError
from mnist_study.study.files import check_writable_folder, file_lock
from mnist_study.study.outcome import Outcome
from mnist_study.study.spec import Variant
from mnist_study.study.sqlite_store import build_store, check_store_file, creation_lock, sqlite_file
from mnist_study.training.config import MNIST_TEST_IMAGES, TrainConfig
from mnist_study.training.data import checksums
from mnist_study.training.machine import cpu_model

PARENT_TAG = "mlflow.parentRunId"
# The MLflow 3 UI opens an experiment by its kind: training runs, not GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
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


# Where the MNIST files come from; ours are byte-identical (their MD5s are checked).
MNIST_ORIGIN = "http://yann.lecun.com/exdb/mnist/"
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "http://", "https://")


def check_tracking_uri(tracking_uri: str, must_exist: bool = False) -> None:
    """Refuse an unsupported scheme, an unwritable folder for a new SQLite store (or, with
    must_exist, a missing one: reading never creates a store), an unreachable server."""
    if not tracking_uri.startswith(SCHEMES):
        raise ConfigError(
            f"--tracking-uri {tracking_uri}: unsupported; use sqlite:///PATH (one machine), "
            f"http://HOST:PORT (an MLflow server) or postgresql://USER@HOST/DB"
        )
    database = sqlite_file(tracking_uri)
    if database is not None:
        if must_exist and not database.is_file():
            raise ConfigError(
                f"--tracking-uri {tracking_uri}: no MLflow store at {database}; "
                f"run a study first or give the right path"
            )
        check_writable_folder(database, "--tracking-uri")
        if database.is_file() and database.stat().st_size:
            with open(database, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise ConfigError(
                        f"--tracking-uri {tracking_uri}: {database} is not an SQLite "
                        f"database; restore the MLflow store or give another path"
                    )
            with file_lock(creation_lock(database)):  # not while another builds it
                check_store_file(tracking_uri, database)
    elif tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri)


def check_server(tracking_uri: str, timeout_s: float = 5) -> None:
    """Fail in seconds, not minutes, on a server that does not answer: one timed request
    to its health endpoint (MLflow's client would retry for minutes)."""
    url = f"{tracking_uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            answer.read()
    except (OSError, ValueError) as exc:  # refused, timed out, not HTTP, an HTTP error
        raise ConfigError(
            f"--tracking-uri {tracking_uri}: the MLflow server does not answer "
            f"({type(exc).__name__}); start it (mlflow server ...) or check the address"
        ) from None


SPEC_TAG = "mnist_study.spec"  # the resolved spec (JSON) a study started with


def prepare_store(
    tracking_uri: str,
    experiment: str,
    description: str = "",
    spec_json: str = "",
    check_recorded: Callable[[dict[str, str]], None] | None = None,
) -> str:
    """Create the database and the experiment once, before any worker starts; an
    existing experiment's recorded spec is first passed to `check_recorded` (which
    raises to refuse it).

    Several processes creating a fresh SQLite store at once race on its tables (two
    commands started together): they take turns under a lock beside the database, so
    the spec that one records is the spec the other compares with.
    """
    database = sqlite_file(tracking_uri)
    args = (tracking_uri, experiment, description, spec_json, check_recorded)
    if database is None:
        return create_experiment(*args)
    with file_lock(creation_lock(database)):
        if not database.exists():
            build_store(database)
        return create_experiment(*args)


def create_experiment(
    tracking_uri: str,
    experiment: str,
    description: str,
    spec_json: str,
    check_recorded: Callable[[dict[str, str]], None] | None = None,
) -> str:
    database = sqlite_file(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if check_recorded is not None:
            check_recorded(found.tags)
        return found.experiment_id
    location = None  # a tracking server (http) decides where artifacts go
    if database is not None:
        location = ((database.parent / "artifacts").resolve() / experiment).as_uri()
    elif not tracking_uri.startswith(("http://", "https://")):  # a database: local folder
        location = (Path("mlruns/artifacts").resolve() / experiment).as_uri()
    tags = dict(EXPERIMENT_KIND)
    if description:
        tags["mlflow.note.content"] = description
    if spec_json:
        tags[SPEC_TAG] = spec_json
    return client.create_experiment(experiment, artifact_location=location, tags=tags)


def find_experiment(tracking_uri: str, experiment: str):
    """The experiment, or None; a SQLite store that does not exist yet is not created
    just to look."""
    database = sqlite_file(tracking_uri)
    if database is None:
        return MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if not database.exists():
        return None
    # Opening a store whose tables another command is still creating would run MLflow's
    # migrations a second time, at once ("expected to match one row"): wait for it.
    with file_lock(creation_lock(database)):
        return MlflowClient(tracking_uri).get_experiment_by_name(experiment)


def experiment_tags(tracking_uri: str, experiment: str) -> dict[str, str] | None:
    """The tags of the experiment, if it exists (its recorded spec among them)."""
    found = find_experiment(tracking_uri, experiment)
    return None if found is None else found.tags


@functools.cache
def git_commit() -> str:
    try:
        repo = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(cfg: TrainConfig, device: str, source: str) -> dict[str, str]:
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
        "device": device,
        "precision": cfg.precision,
        "threads": str(cfg.threads or torch.get_num_threads()),
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
        query = f"tags.role = 'variant' and tags.variant = '{cell.name}'"
        tags = {"role": "variant", "variant": cell.name, "mlflow.note.content": cell.description}
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
