"""Floating-point operations per image, for compute frontiers that compare networks of different sizes.

Counted by torch's FlopCounterMode, which sees matrix products and convolutions (forward and backward),
the operations that dominate both networks here; elementwise work is left out, as is usual. One
multiply-add counts as two operations.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from cmboost.cm.sample import choose_sampler, sample_batch


def count_flops(fn: Callable[[], object]) -> int:
    """Operations that `fn()` performs, forward and backward passes included."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def generator_step_flops(loaded) -> int:
    """One network evaluation of a consistency model (cm.checkpoint.LoadedModel) on one image."""

    choice = choose_sampler(loaded, 1)
    return count_flops(lambda: sample_batch(loaded, choice, [0], seed=0, device=torch.device("cpu")))


def booster_step_flops(model: torch.nn.Module, image_shape: tuple[int, int, int]) -> int:
    """One boosting step of a joint network on one image: a forward pass and the backward pass to the
    input (what every PGD, SGLD and BIGRoC step costs)."""
    model = copy.deepcopy(model).cpu().eval()  # a copy: the caller's network stays on its device
    model.requires_grad_(False)                 # boosting differentiates with respect to the image only
    x = torch.rand(1, *image_shape, requires_grad=True)
    return count_flops(lambda: model(x).log_softmax(1)[:, 0].sum().backward())
