"""Splits: sizes, stratification, disjointness, the test set kept apart."""

from __future__ import annotations

import numpy as np

from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import make_splits, stratified_split


def test_stratified_split_exact_size_and_class_shares():
    labels = np.repeat(np.arange(10), [100, 90, 110, 95, 105, 100, 98, 102, 97, 103])
    taken, rest = stratified_split(labels, 100, seed=0)
    assert len(taken) == 100 and len(rest) == len(labels) - 100
    assert not set(taken) & set(rest)
    shares = np.bincount(labels[taken], minlength=10)
    expected = np.bincount(labels, minlength=10) * 100 / len(labels)
    assert np.all(np.abs(shares - expected) < 1)


def test_stratified_split_is_seeded():
    labels = np.arange(1000) % 10
    assert np.array_equal(stratified_split(labels, 50, 3)[0], stratified_split(labels, 50, 3)[0])
    assert not np.array_equal(
        stratified_split(labels, 50, 3)[0], stratified_split(labels, 50, 4)[0]
    )


def fake_arrays(n_train=600, n_test=100):
    rng = np.random.default_rng(0)
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(n_test) % 10).astype(np.uint8),
    }


def test_real_split_sizes_and_disjointness(mnist_root):
    from mnist_study.training.mnist_data import load_splits

    s = load_splits(mnist_root, TrainConfig())
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (55_000, 5_000, 10_000)
    assert len(s.train_eval_x) == 10_000
    # Validation images are not among the training images.
    train_keys = {hash(row.numpy().tobytes()) for row in s.train_x}
    assert sum(hash(row.numpy().tobytes()) in train_keys for row in s.val_x) < 10  # dupes
    assert np.all(np.bincount(s.val_y.numpy(), minlength=10) >= 450)


def test_train_size_subsets_training_only():
    arrays = fake_arrays()
    full = make_splits(arrays, TrainConfig(val_size=100, train_eval_size=50))
    small = make_splits(arrays, TrainConfig(val_size=100, train_size=200, train_eval_size=50))
    assert len(full.train_x) == 500 and len(small.train_x) == 200
    assert np.array_equal(full.val_x, small.val_x)  # validation unchanged
    assert np.all(np.bincount(small.train_y.numpy(), minlength=10) == 20)
    assert len(small.train_eval_x) == 50


def test_test_size_scores_a_fixed_stratified_subset_of_the_test_set():
    arrays = fake_arrays(n_test=100)
    whole = make_splits(arrays, TrainConfig(val_size=100, train_eval_size=50))
    part = make_splits(arrays, TrainConfig(val_size=100, train_eval_size=50, test_size=30))
    again = make_splits(arrays, TrainConfig(val_size=100, train_eval_size=50, test_size=30))
    assert len(whole.test_x) == 100 and np.array_equal(whole.test_y, arrays["test_y"])
    assert len(part.test_x) == 30 and np.array_equal(part.test_x, again.test_x)
    assert np.all(np.bincount(part.test_y.numpy(), minlength=10) == 3)
    assert np.array_equal(part.train_x, whole.train_x)  # nothing else changes


def test_normalizing_by_table_equals_the_formula_for_every_pixel_value():
    import numpy as np
    import torch

    from mnist_study.training.mnist_data import MEAN, STD, to_tensor

    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    formula = (torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(1) - MEAN) / STD
    assert torch.equal(to_tensor(pixels), formula)
