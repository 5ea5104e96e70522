"""The trainer on real MNIST, shrunk: metrics, determinism, divergence, end to end."""

from __future__ import annotations

import pytest
import torch

from mnist_study.errors import Diverged
from mnist_study.training.config import TrainConfig
from mnist_study.training.train import Training, evaluate_test, evaluation_points, fit

SMALL = TrainConfig(train_size=1000, val_size=500, train_eval_size=500, epochs=2, threads=1)
KEYS = {
    "train_loss",
    "train_acc",
    "train_loss_running",
    "val_loss",
    "val_acc",
    "lr",
    "train_seconds",
    "optimizer_steps",
}


def without_time(history):
    return [{k: v for k, v in m.items() if k != "train_seconds"} for m in history]


def test_history_has_one_entry_per_epoch_with_all_metrics(small_splits):
    result = Training(SMALL, small_splits)
    assert [point for point, _ in result] == [1, 2] and result.last == 2
    assert [set(m) for m in result.history] == [KEYS, KEYS]
    assert result.history[-1]["lr"] == SMALL.lr
    assert all(0 <= m["val_acc"] <= 1 for m in result.history)


@pytest.mark.parametrize("change", [{}, {"augment": True, "dropout": 0.3, "batchnorm": True}])
def test_same_config_and_seed_give_identical_metrics(small_splits, change):
    cfg = SMALL.replace(epochs=1, **change)
    first = without_time(fit(cfg, small_splits).history)
    again = without_time(fit(cfg, small_splits).history)
    other = without_time(fit(cfg.replace(seed=1), small_splits).history)
    assert first == again
    assert first != other


def test_nan_loss_stops_with_epoch_and_step(small_splits):
    cfg = SMALL.model_copy(update={"optimizer": "sgd", "lr": 1e12})  # past the bound
    with pytest.raises(Diverged) as err:
        fit(cfg, small_splits)
    assert err.value.epoch == 1 and err.value.step >= 1
    assert f"epoch 1, step {err.value.step}" in str(err.value)


def test_baseline_learns_end_to_end(small_splits):
    """A short real run: the seed's setup on 1,000 MNIST images reaches >85% validation."""
    result = fit(SMALL.replace(epochs=3), small_splits)
    assert result.history[-1]["val_acc"] > 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    test = evaluate_test(result.model, small_splits, SMALL)
    assert test["test_acc"] > 0.85 and len(small_splits.test_y) == 10_000


def test_train_command_logs_each_seed_to_mlflow(tmp_path):
    from helpers import cli, runs

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    done = cli(
        "train",
        "--train-size",
        "300",
        "--val-size",
        "200",
        "--train-eval-size",
        "200",
        "--epochs",
        "2",
        "--seeds",
        "0",
        "1",
        "--test",
        "--mlflow",
        "solo",
        "--tracking-uri",
        tracking,
        process=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("  epoch ") == 4 and "2 seeds (mean ± sd)" in done.stdout
    client, found = runs(tracking, "solo")
    assert sorted(r.info.run_name for r in found) == ["train/seed-0", "train/seed-1"]
    for run in found:
        assert run.info.status == "FINISHED" and run.data.params["seed"] in ("0", "1")
        assert run.data.tags["outcome"] == "complete" and "optuna_state" not in run.data.tags
        assert [
            m.step for m in client.get_metric_history(run.info.run_id, "accuracy/validation")
        ] == [1, 2]
        assert 0 < run.data.metrics["accuracy/test"] <= 1


def test_evaluation_points_by_epoch_or_spread_over_steps():
    cfg = TrainConfig(train_size=1000, batch_size=64, epochs=3)  # 16 steps an epoch
    assert evaluation_points(cfg, 1000) == [16, 32, 48]
    assert evaluation_points(cfg.replace(steps=50, evals=10), 1000) == list(range(5, 51, 5))
    assert evaluation_points(cfg.replace(steps=40), 1000) == [16, 32, 40]
    # 300 images are 5 steps an epoch: 10 points still, whatever the size.
    assert len(evaluation_points(cfg.replace(steps=30, evals=10), 300)) == 10


def test_steps_train_exactly_like_epochs_and_log_at_each_point(small_splits):
    per_epoch = -(-len(small_splits.train_x) // SMALL.batch_size)
    by_epoch = fit(SMALL, small_splits)
    by_step = Training(SMALL.replace(steps=2 * per_epoch, evals=2), small_splits)
    assert [point for point, _ in by_step] == [per_epoch, 2 * per_epoch]
    assert without_time(by_step.history) == without_time(by_epoch.history)
    for a, b in zip(by_epoch.model.parameters(), by_step.model.parameters(), strict=True):
        assert a.equal(b)


def test_threads_mean_one_thing_in_train_and_in_a_study():
    """`threads` is threads per run wherever it is read: 1 by default, 0 one per core (as
    torch would), and a study's --threads overrides the spec's without another meaning."""
    from mnist_study.study.run_options import RunOptions
    from mnist_study.training.train import thread_count

    per_core = TrainConfig(threads=0)
    assert TrainConfig().threads == 1
    assert thread_count(per_core) == torch.get_num_threads()
    opts = RunOptions("sqlite:///mlflow.db", "optuna.journal", "data")
    assert opts.run_threads(TrainConfig()) == 1
    assert opts.run_threads(per_core) == 0
    assert RunOptions("sqlite:///mlflow.db", "j", "data", threads=2).run_threads(per_core) == 2
    assert RunOptions("sqlite:///mlflow.db", "j", "data", threads=0).run_threads(TrainConfig()) == 0
