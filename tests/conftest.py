"""Shared fixtures: real MNIST (fetched once into the repo's data/ folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The tests see what a user's shell sees, not the `make test` that started them (the
# tool says less under make, whose targets report by themselves).
os.environ.pop("MAKELEVEL", None)

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO / "data"


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    from mnist_study.training.mnist_data import fetch

    fetch(DATA_ROOT)
    return DATA_ROOT


@pytest.fixture(scope="session")
def small_splits(mnist_root):
    """Real MNIST, shrunk: 1,000 training images, 500 validation."""
    from mnist_study.training.config import TrainConfig
    from mnist_study.training.mnist_data import load_splits

    return load_splits(mnist_root, TrainConfig(train_size=1000, val_size=500, train_eval_size=500))


@pytest.fixture(scope="session")
def smoke_original(tmp_path_factory, worker_id, mnist_root):
    """experiments/smoke.toml run once, in-process, into real stores in a tmp dir. Under
    pytest-xdist (make test runs 2 processes) the first process to need it runs it and
    the others wait for it. Tests read copies of it (smoke_study), never this."""
    from mnist_study.store_paths import file_lock
    from mnist_study.study.runner import RunOptions, run_study
    from mnist_study.study.spec_file import load_spec

    shared = shared_folder(tmp_path_factory, worker_id)
    tmp = shared / "smoke"
    tracking, storage = f"sqlite:///{tmp}/mlflow.db", str(tmp / "optuna.journal")
    spec = load_spec(REPO / "experiments" / "smoke.toml")
    with file_lock(shared / "smoke.lock"):
        if not (tmp / "done").exists():
            tmp.mkdir(exist_ok=True)
            run_study(spec, RunOptions(tracking, storage, str(mnist_root)))
            (tmp / "done").touch()
    return spec, tmp


@pytest.fixture
def smoke_study(smoke_original, tmp_path):
    """This test's own copy of the smoke study's stores: (spec, tracking URI, storage)."""
    from helpers import copy_stores

    spec, original = smoke_original
    copy = copy_stores(original, tmp_path / "smoke")
    return spec, f"sqlite:///{copy}/mlflow.db", str(copy / "optuna.journal")


@pytest.fixture(scope="session")
def finished(tmp_path_factory, worker_id, mnist_root) -> Path:
    """A finished tiny study (its own process, now gone): spec and both stores in one
    folder, which tests copy (copy_of) to change. Made once per test session, by the
    first test process to need it, as smoke_original is."""
    from helpers import TINY, cli, run_args, stores

    from mnist_study.store_paths import file_lock

    shared = shared_folder(tmp_path_factory, worker_id)
    root = shared / "finished"
    with file_lock(shared / "finished.lock"):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)  # a process that died making it
            root.mkdir()
            (root / "tiny.toml").write_text(TINY)
            done = cli(*run_args(root / "tiny.toml", *stores(root)))
            assert done.returncode == 0, done.stderr[-2000:]
            (root / "done").touch()
    return root


def shared_folder(tmp_path_factory, worker_id: str) -> Path:
    """A folder all test processes of this session share: each pytest-xdist process has
    its own basetemp under the session's."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent
