"""Shared fixtures: real MNIST (fetched once into the repo's data/ folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO / "data"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (make test runs 2 processes), the tests that read one shared
    study run in one process, so that it is run once, not once per process."""
    for item in items:
        for fixture in ("smoke_study", "finished", "sweep"):
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(fixture))
                break


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    from mnist_study.training.data import fetch

    fetch(DATA_ROOT)
    return DATA_ROOT


@pytest.fixture(scope="session")
def small_splits(mnist_root):
    """Real MNIST, shrunk: 1,000 training images, 500 validation."""
    from mnist_study.training.config import TrainConfig
    from mnist_study.training.dataset import load_splits

    return load_splits(mnist_root, TrainConfig(train_size=1000, val_size=500, train_eval_size=500))


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory, mnist_root):
    """experiments/smoke.toml run once, in-process, into real stores in a tmp dir."""
    from mnist_study.study.runner import RunOptions, run_study
    from mnist_study.study.spec import load_spec

    tmp = tmp_path_factory.mktemp("smoke")
    tracking, storage = f"sqlite:///{tmp}/mlflow.db", str(tmp / "optuna.journal")
    spec = load_spec(REPO / "experiments" / "smoke.toml")
    run_study(spec, RunOptions(tracking, storage, str(mnist_root)))
    return spec, tracking, storage
