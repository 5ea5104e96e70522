"""Batched random affine augmentation: one affine_grid + grid_sample for the whole batch.

Drawing and warping are apart so that the warp can run inside a CUDA graph: the
parameters come from the run's seeded CPU generator (reproducible on any device) and
reach the device through a static buffer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def draw_affine(
    n: int, generator: torch.Generator, rotate_deg: float, shift: float, zoom: float
) -> torch.Tensor:
    """(4, n): per image an angle uniform in +-rotate_deg (radians), a scale uniform in
    1 +- zoom, and x and y shifts uniform in +-shift of the side."""

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(rotate_deg))
    scale = 1 + uniform(zoom)
    # affine_grid works in [-1, 1] coordinates, so a shift of 10% of the side is 0.2.
    tx, ty = uniform(2 * shift), uniform(2 * shift)
    return torch.stack([angle, scale, tx, ty])


def apply_affine(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Rotate, zoom and shift each image of x (N, C, H, W) by its column of `params`."""
    angle, scale, tx, ty = params
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # 'border' repeats the edge pixels, which are background in MNIST; 'zeros' would
    # paint the normalized value 0 (mid-grey) into the corners.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
