"""The PAG picture: targeted PGD from a flat grey image toward each class, which shows what the network's
gradients draw."""

from __future__ import annotations

import numpy as np
import torch

from cmboost.boosting.config import step_length
from cmboost.boosting.methods import frozen
from cmboost.diagnostic.measures import index_blocks, logits_of
from cmboost.files.report import auto_scale, image_grid, upscale
from cmboost.files.samples import to_uint8
from cmboost.jcd.attacks import PGD
from cmboost.jcd.model import log_prob_from_logits
from cmboost.runtime import BLOCK_SIZE


def pag_targets(model, starts: torch.Tensor, num_classes: int, eps: float, steps: int,
                batch_size: int = BLOCK_SIZE, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted L2 PGD on log p(k|x) from each start toward each class k: images [R, K, C, H, W] and
    the final p(k|x) [R, K]."""
    r = len(starts)
    x0 = starts.repeat_interleave(num_classes, dim=0)
    targets = torch.arange(num_classes, device=starts.device).repeat(r)
    attack = PGD(norm="l2", eps=eps, step_size=step_length(eps, steps), steps=steps, random_start=False,
                 bounds=(0.0, 1.0), precision=precision)
    out = []
    with frozen(model):
        for block in index_blocks(len(x0), batch_size):
            y = targets[block]
            out.append(attack(model, lambda z, y=y: log_prob_from_logits(model(z), y), x0[block]))
    adv = torch.cat(out)
    prob = log_prob_from_logits(logits_of(model, adv, batch_size, precision), targets).exp()
    return adv.view(r, num_classes, *starts.shape[1:]), prob.view(r, num_classes)


def pag_grid(starts: torch.Tensor, targeted: torch.Tensor) -> np.ndarray:
    """One row per start: the start, then its image pushed toward class 0, 1, ..., K-1 (uint8 HW or HWC),
    upscaled so that single pixels show as squares."""

    rows, k = targeted.shape[:2]
    tiles = torch.cat([starts[:, None], targeted], dim=1).flatten(0, 1)
    tiles = to_uint8(tiles)
    return image_grid(upscale(tiles, auto_scale(tiles)), columns=k + 1, pad=2 * auto_scale(tiles))


def pick_starts(labels: np.ndarray, count: int, seed: int) -> list[int]:
    """`count` indices drawn with `seed`, distinct classes first (one image per class in draw order,
    then the rest in draw order)."""
    order = np.random.default_rng([int(seed), 1]).permutation(len(labels))
    seen, first, rest = set(), [], []
    for i in order:
        (rest if labels[i] in seen else first).append(int(i))
        seen.add(labels[i])
    return (first + rest)[:count]
