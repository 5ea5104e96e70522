"""The seed's CNN and the switches that build each ablation variant (train.build_model
sets them from the config)."""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, convs: int, batchnorm: bool) -> nn.Sequential:
    """convs x (Conv 3x3 [BN] ReLU), then MaxPool 2.

    The last ReLU runs after the pool: max and ReLU commute (ReLU is monotone), so the
    function and its gradients are the seed's, but ReLU and its backward touch 4x fewer
    values; on this CPU that is ~1.4x the training speed.
    """
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        if i < convs - 1:
            layers.append(nn.ReLU())
    layers += [nn.MaxPool2d(2), nn.ReLU()]
    return nn.Sequential(*layers)


class SeedCNN(nn.Module):
    """Conv 1->32, pool, Conv 32->64, pool, FC 3136->128, FC 128->10 (421,642 parameters).

    - batchnorm: BatchNorm2d after every convolution, before its ReLU.
    - dropout: on the inputs of both fully connected layers. They hold 95% of the
      weights (401,536 of 421,642), so that is where the net can memorize; dropout on
      the few conv filters mostly slows learning.
    - convs_per_block: the 'deeper' net stacks more 3x3 convolutions per block
      (VGG-style) and keeps two blocks, so the FC head and its input size stay the
      seed's and only conv depth changes.
    """

    def __init__(self, batchnorm: bool = False, dropout: float = 0.0, convs_per_block: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(1, 32, convs_per_block, batchnorm),
            conv_block(32, 64, convs_per_block, batchnorm),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_flops_per_image(model: nn.Module) -> float:
    """Multiply-adds of a forward pass x 2 FLOP x 3 (forward, backward for inputs and weights)."""
    macs, side = 0, 28
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            macs += side * side * m.out_channels * m.in_channels * 9
        elif isinstance(m, nn.MaxPool2d):
            side //= 2
        elif isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features
    return 6.0 * macs


@functools.cache
def step_seconds(convs_per_block: int, batchnorm: bool, dropout: bool, batch: int) -> float:
    """Seconds of one training step (forward, backward, Adam) of this net on a batch of
    random images, here and now: the median of 5 after 2 warm-up steps. What a variant
    not yet measured is priced by, relative to those measured (its FLOPs alone price
    the deeper net at 4.4x the baseline, where a 2-core CPU takes ~3x its time)."""
    model = SeedCNN(batchnorm, 0.5 if dropout else 0.0, convs_per_block)
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    seconds = []
    for _ in range(7):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[2:])
