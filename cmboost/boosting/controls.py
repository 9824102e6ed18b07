"""Simple controls that any boosting result must beat, and the blur that sets a bar for generators.

A boosting method earns its keep only if it beats edits that know nothing about the joint network:
- `unsharp_mask`: classic sharpening, x + amount * (x - G_sigma * x). Feature-based metrics reward
  sharper images, so a method that merely sharpens should not beat this control.
- `random_perturbation`: a random direction per image with the same L2 norm as a given change
  (the joint-network PGD change of that image), so "any edit of that size" is measured.
- `gaussian_blur`: real images blurred with sigma = 1 give the bar a usable generator should reach.

All take and return float NCHW images in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from cmboost.errors import UserInputError
from cmboost.runtime import randn_per_sample, sample_generators


@dataclasses.dataclass(frozen=True)
class UnsharpControl:
    """x + amount * (x - G_sigma * x), clamped to [0, 1]."""
    amount: float = 1.0
    sigma: float = 1.0

    def __post_init__(self):
        for name in ("amount", "sigma"):  # a file can hold a string where a number belongs
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserInputError(f"unsharp {name} {value!r}: must be a number")
        if not (math.isfinite(self.amount) and self.amount >= 0):
            raise UserInputError(f"unsharp amount {self.amount}: must be finite and >= 0")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise UserInputError(f"unsharp sigma {self.sigma}: must be finite and > 0")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a kernel of radius ceil(3 sigma) and reflected borders."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype).to(images.device)
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(), groups=channels)


def unsharp_mask(images: torch.Tensor, control: UnsharpControl) -> torch.Tensor:
    """Unsharp masking: adds back `amount` times the detail that a Gaussian blur removes."""
    return (images + control.amount * (images - gaussian_blur(images, control.sigma))).clamp(0.0, 1.0)


def random_perturbation(images: torch.Tensor, norms: torch.Tensor, seed: int,
                        indices: Sequence[int] | None = None, iterations: int = 30) -> torch.Tensor:
    """Each image moved along its own Gaussian random direction (stream (seed, index)) so that,
    after clamping to [0, 1], its change has L2 norm `norms[i]`. Clamping shortens a change, so
    the length along the direction is found by bisection per image; where even the longest move
    cannot reach the norm (a saturated image), the longest one is kept."""
    if norms.shape != (len(images),):
        raise ValueError(f"random_perturbation: {len(norms)} norms for {len(images)} images")
    indices = range(len(images)) if indices is None else indices
    direction = randn_per_sample(sample_generators(seed, indices), images.shape[1:], device=images.device)
    return move_to_norm(images, direction, norms, iterations)


def move_to_norm(images: torch.Tensor, direction: torch.Tensor, norms: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Each image moved along its own `direction` so that, after clamping to [0, 1], its change has
    L2 norm `norms[i]`. Clamping shortens a change, so the length along the direction is found by
    bisection per image; where even the longest move cannot reach the norm (a saturated image),
    the longest one is kept."""
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    target = norms.to(images.device, images.dtype)

    def change_norm(length: torch.Tensor) -> torch.Tensor:
        moved = (images + length.view(-1, 1, 1, 1) * direction).clamp(0.0, 1.0)
        return (moved - images).flatten(1).norm(dim=1)

    # The change's norm grows monotonically with the length, so bisect on [0, hi].
    low = torch.zeros_like(target)
    high = torch.full_like(target, math.sqrt(images[0].numel()))  # moves every pixel by up to 1
    for _ in range(iterations):
        middle = (low + high) / 2
        short = change_norm(middle) < target
        low, high = torch.where(short, middle, low), torch.where(short, high, middle)
    return (images + high.view(-1, 1, 1, 1) * direction).clamp(0.0, 1.0)


def l2_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm of after - before (float64 for the record)."""
    return (after.double() - before.double()).flatten(1).norm(dim=1)
