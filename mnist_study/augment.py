"""Batched random affine augmentation: one affine_grid + grid_sample for the whole batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    rotate_deg: float = 10.0,
    shift: float = 0.1,
    zoom: float = 0.1,
) -> torch.Tensor:
    """Rotate, translate and zoom each image of x (N, C, H, W) by its own random amounts.

    Angles are uniform in +-rotate_deg, shifts uniform in +-shift of the side, scale
    uniform in 1 +- zoom. Parameters are drawn on the CPU generator (so runs are
    reproducible on any device), then the warp runs as one batched op on x's device.
    """
    n = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(rotate_deg))
    scale = 1 + uniform(zoom)
    # affine_grid works in [-1, 1] coordinates, so a shift of 10% of the side is 0.2.
    tx, ty = uniform(2 * shift), uniform(2 * shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(
        device=x.device, dtype=x.dtype
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # 'border' repeats the edge pixels, which are background in MNIST; 'zeros' would
    # paint the normalized value 0 (mid-grey) into the corners.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
