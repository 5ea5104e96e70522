"""Train one configuration on in-memory MNIST and report per-epoch metrics.

Speed comes from what is left out: no DataLoader, no per-sample transforms. Batches
are slices of tensors already normalized in memory, drawn by a seeded permutation;
the model runs channels_last, optionally under bf16 autocast.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mnist_study.errors import ConfigError
from mnist_study.training.config import TrainConfig
from mnist_study.training.mnist_data import Splits
from mnist_study.training.model import SeedCNN
from mnist_study.training.step import Stepper, autocast

# Larger eval batches thrash a CPU's cache (conv1 activations of 2048 images are
# 200 MB); a GPU wants them as large as memory allows.
EVAL_BATCH = {"cpu": 256, "cuda": 8192}


@functools.cache
def keep_freed_memory() -> None:
    """Keep freed activation buffers in the process heap (glibc only).

    By default glibc hands multi-megabyte blocks back to the OS when freed, so every step
    page-faults its activations in again: zero-filling fresh gradient buffers took 11% of
    a step here. Keeping them made training ~10% faster on this CPU (median of A/B runs).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: heap, not mmap, up to glibc's 32 MB cap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not shrink the heap after each step


def check_device(cfg: TrainConfig, source: str) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{source}: device = 'cuda' but torch finds no CUDA GPU here; use 'auto' or 'cpu'"
        )


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def thread_count(cfg: TrainConfig) -> int:
    """The CPU threads a run of `cfg` uses (its `threads`; 0: torch's, one per core)."""
    return cfg.threads or torch.get_num_threads()


def build_model(cfg: TrainConfig) -> SeedCNN:
    return SeedCNN(cfg.batchnorm, cfg.dropout, cfg.convs_per_block)


def make_optimizer(
    cfg: TrainConfig, model: nn.Module, capturable: bool = False
) -> torch.optim.Optimizer:
    """`capturable`: Adam keeps its step count on the device, as a CUDA graph needs."""
    if cfg.optimizer == "adam":
        # AdamW: with weight_decay=0 it is exactly Adam; with decay, the decay is not
        # rescaled by Adam's preconditioner (plain L2 in Adam barely regularizes).
        # fused: one kernel for all parameters instead of ~10 small ops each.
        return torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            fused=True,
            capturable=capturable,
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=True,
    )


def prepare_batch(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def batch_order(
    n: int, batch_size: int, order: torch.Generator, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """(pass number, batch indices) without end: a fresh seeded permutation per pass, the
    last batch of a pass possibly smaller."""
    for pass_number in itertools.count(1):
        perm = torch.randperm(n, generator=order).to(device)
        for start in range(0, n, batch_size):
            yield pass_number, perm[start : start + batch_size]


def evaluation_points(cfg: TrainConfig, n_train: int) -> list[int]:
    """The optimizer steps after which a run is evaluated (the last one ends training).

    By default one per epoch. With `steps`, training lasts that many steps whatever the
    training-set size, and `evals` spreads the evaluations evenly over them, so that a
    500-image run (8 steps an epoch) still has a curve.
    """
    per_epoch = math.ceil(n_train / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    if cfg.evals:
        return sorted({max(1, round(total * i / cfg.evals)) for i in range(1, cfg.evals + 1)})
    return sorted({min(total, per_epoch * e) for e in range(1, math.ceil(total / per_epoch) + 1)})


def last_point(cfg: TrainConfig, n_train: int) -> int:
    """The index (MLflow step) of a run's last evaluation, where its test metrics go."""
    points = evaluation_points(cfg, n_train)
    return points[-1] if cfg.axis == "step" else len(points)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig):
    """(mean loss, accuracy) in eval mode, without augmentation."""
    model.eval()
    batch = EVAL_BATCH.get(x.device.type, 256)
    loss_sum, correct = x.new_zeros((), dtype=torch.float64), x.new_zeros((), dtype=torch.long)
    for start in range(0, len(x), batch):
        xb, yb = x[start : start + batch], y[start : start + batch]
        with autocast(cfg, x.device):
            logits = model(prepare_batch(xb)).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(x), correct.item() / len(x)  # one sync per pass


class Training:
    """One run of `cfg`, stepped by its caller: `for point, metrics in run: ...`, each
    evaluation point in turn (the epoch number, or with `steps`/`evals` the optimizer
    step; see evaluation_points); then `run.model` and `run.history`. A caller stops it
    early by raising (the pruner, a signal) or by leaving the loop.

    Metrics per point: train_loss/train_acc (clean eval-mode pass over a fixed training
    subset, so dropout and augmentation do not hide the gap), train_loss_running (mean
    optimizer loss), val_loss, val_acc, lr, train_seconds (training since the previous
    point, evaluation left out), optimizer_steps (so far).
    Raises Diverged if the loss stops being finite. The test set is not touched.
    """

    def __init__(self, cfg: TrainConfig, splits: Splits):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.splits = splits.to(self.device)
        self.points = evaluation_points(cfg, len(splits.train_x))
        self.last = last_point(cfg, len(splits.train_x))  # the MLflow step of its end
        self.history: list[dict[str, float]] = []
        self.test: dict[str, float] = {}  # test_loss, test_acc: a final run's, after fit

    @property
    def result(self) -> dict[str, float]:
        """The last point's metrics, and the test set's where it was scored."""
        return dict(self.history[-1]) | self.test

    def __iter__(self) -> Iterator[tuple[int, dict[str, float]]]:
        cfg, splits, device = self.cfg, self.splits, self.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device.type == "cpu":
            keep_freed_memory()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(device=device, memory_format=torch.channels_last)
        self.model = model
        graph = cfg.cuda_graph and device.type == "cuda"
        optimizer = make_optimizer(cfg, model, capturable=graph)
        order = torch.Generator().manual_seed(cfg.seed)
        augment_rng = torch.Generator().manual_seed(cfg.seed + 1) if cfg.augment else None
        batches = batch_order(len(splits.train_x), cfg.batch_size, order, device)
        stepper = Stepper(model, optimizer, splits.train_x, splits.train_y, cfg, graph)
        done = 0
        for number, point in enumerate(self.points, 1):
            started = time.perf_counter()
            running = stepper.steps(batches, augment_rng, point - done)  # ends in a sync
            seconds = time.perf_counter() - started
            done = point
            train_loss, train_acc = evaluate(model, splits.train_eval_x, splits.train_eval_y, cfg)
            val_loss, val_acc = evaluate(model, splits.val_x, splits.val_y, cfg)
            metrics = {
                "train_loss": train_loss,
                "train_acc": train_acc,
                "train_loss_running": running,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "train_seconds": seconds,
                "optimizer_steps": point,
            }
            self.history.append(metrics)
            yield (point if cfg.axis == "step" else number), metrics


def fit(
    cfg: TrainConfig,
    splits: Splits,
    on_point: Callable[[int, int, dict[str, float]], None] | None = None,
    test: bool = False,
) -> Training:
    """One run's life, whoever observes it: train `cfg` to its end, calling
    `on_point(point, last point, metrics)` at each evaluation point (it logs, prints, and
    may stop the run by raising: the pruner, a signal), then with `test` score the test
    set (a final run's alone). Returns the run: its model, history, `test` and `result`."""
    run = Training(cfg, splits)
    for point, metrics in run:
        if on_point is not None:
            on_point(point, run.last, metrics)
    if test:
        run.test = evaluate_test(run.model, splits, cfg)
    return run


def point_line(cfg: TrainConfig, point: int, last: int, m: dict[str, float]) -> str:
    """The console line of one evaluation point."""
    return (
        f"  {cfg.axis} {point}/{last}  train acc {m['train_acc']:.4f} "
        f"loss {m['train_loss']:.4f}"
        f" | val acc {m['val_acc']:.4f} loss {m['val_loss']:.4f} | {m['train_seconds']:.1f}s"
    )


def evaluate_test(model: nn.Module, splits: Splits, cfg: TrainConfig) -> dict[str, float]:
    """Test metrics: for final runs only, never for selection."""
    device = next(model.parameters()).device
    loss, acc = evaluate(model, splits.test_x.to(device), splits.test_y.to(device), cfg)
    return {"test_loss": loss, "test_acc": acc}
