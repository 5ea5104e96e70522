"""MNIST held in memory as tensors, split once: train / validation / test.

The split is stratified and seeded by `split_seed`, so every run of a study sees the
same validation set. The 10k test images are only ever read by `evaluate_test`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_files import load_arrays

# The usual MNIST pixel statistics (of the 60k training images, after /255).
MEAN, STD = 0.1307, 0.3081


def stratified_split(labels: np.ndarray, n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (taken, rest): `n_take` drawn so each class keeps its share, seeded."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_take / len(labels)
    take = np.floor(quota).astype(int)
    # Largest remainders get the leftover places so the total is exactly n_take.
    leftover = n_take - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
    taken, rest = [], []
    for cls, k in zip(classes, take, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        taken.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


# Every pixel value's normalized float32, computed as (v / 255 - MEAN) / STD would be:
# one table lookup per pixel instead of three passes over the whole array.
NORMALIZED = (np.arange(256, dtype=np.float32) / 255 - MEAN) / STD


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) to normalized float32 (N, 1, 28, 28)."""
    return torch.from_numpy(NORMALIZED[images]).unsqueeze(1)


@dataclass
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    train_eval_x: torch.Tensor  # fixed subset of train, measured each epoch
    train_eval_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device) -> Splits:
        return Splits(**{k: v.to(device) for k, v in vars(self).items()})


def make_splits(arrays: dict[str, np.ndarray], cfg: TrainConfig) -> Splits:
    labels = arrays["train_y"]
    val_idx, train_idx = stratified_split(labels, cfg.val_size, cfg.split_seed)
    if cfg.train_size < len(train_idx):
        # Subset of the training part only; validation stays the same.
        pick, _ = stratified_split(labels[train_idx], cfg.train_size, cfg.split_seed + 1)
        train_idx = train_idx[pick]
    n_eval = min(cfg.train_eval_size, len(train_idx))
    eval_pick, _ = stratified_split(labels[train_idx], n_eval, cfg.split_seed + 2)
    test_idx = np.arange(len(arrays["test_y"]))
    if cfg.test_size < len(test_idx):
        test_idx, _ = stratified_split(arrays["test_y"], cfg.test_size, cfg.split_seed + 3)
    # Cut the uint8 images first: only the images a split holds are converted.
    images, y = arrays["train_x"], torch.from_numpy(labels.astype(np.int64))
    train_x, train_y = to_tensor(images[train_idx]), y[train_idx]
    return Splits(
        train_x=train_x,
        train_y=train_y,
        val_x=to_tensor(images[val_idx]),
        val_y=y[val_idx],
        train_eval_x=train_x[eval_pick],
        train_eval_y=train_y[eval_pick],
        test_x=to_tensor(arrays["test_x"][test_idx]),
        test_y=torch.from_numpy(arrays["test_y"][test_idx].astype(np.int64)),
    )


_ARRAYS: dict[Path, dict[str, np.ndarray]] = {}
_SPLITS: dict[tuple, Splits] = {}


def load_splits(root: Path, cfg: TrainConfig) -> Splits:
    """Read (once per process) and split the verified MNIST files under `root`.

    Splits are cached per split setting: a study's runs share them. Training never
    modifies them in place.
    """
    root = Path(root).resolve()
    if root not in _ARRAYS:
        _ARRAYS[root] = load_arrays(root)
    key = (root, cfg.train_size, cfg.val_size, cfg.train_eval_size, cfg.test_size, cfg.split_seed)
    if key not in _SPLITS:
        _SPLITS[key] = make_splits(_ARRAYS[root], cfg)
    return _SPLITS[key]
