"""What made a run, as MLflow shows it: the command and commit (its source tags),
versions, device, machine, and the data it read (MLflow datasets with the files' MD5s)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import mlflow
import optuna
import torch
from mlflow.entities import DatasetInput, InputTag

from mnist_study.training.config import MNIST_TEST_IMAGES, TrainConfig
from mnist_study.training.data import checksums
from mnist_study.training.machine import cpu_model
from mnist_study.training.train import resolve_device

# Where the MNIST files come from; ours are byte-identical (their MD5s are checked).
MNIST_ORIGIN = "http://yann.lecun.com/exdb/mnist/"
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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
