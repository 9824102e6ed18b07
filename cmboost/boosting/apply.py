"""One boosting method or control applied to images by name, as tune scores a candidate and the demo and
the diagnostic apply one."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from cmboost.boosting.config import make_hyper
from cmboost.boosting.controls import UnsharpControl, l2_change, unsharp_mask
from cmboost.boosting.methods import boost_with
from cmboost.errors import UserInputError
from cmboost.files.samples import to_float, to_uint8
from cmboost.records import field_default
from cmboost.tuning.candidates import TuneSettings


def apply_method(method: str, hyper: dict, model, classifier, images: torch.Tensor, labels: torch.Tensor,
                 indices: Sequence[int], precision: str = "fp32") -> torch.Tensor:
    """One candidate on one batch of float images: a boosting method or a control."""
    if method == "unsharp":
        return unsharp_mask(images, UnsharpControl(**hyper))
    net = classifier if method == "bigroc" else model
    if net is None:
        raise UserInputError("bigroc candidates need a classifier (--classifier)")
    return boost_with(net, images, labels, method, make_hyper(method, **hyper), indices, precision)


def run_method(method: str, hyper: dict, model, classifier, images_u8: np.ndarray, labels: np.ndarray,
               device, batch_size: int = field_default(TuneSettings, "batch_size"),
               precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, per-image L2 change in [0, 1] units) of a whole sample array."""
    out, change = [], []
    for start in range(0, len(images_u8), batch_size):
        x = to_float(images_u8[start:start + batch_size]).to(device)
        y = torch.as_tensor(labels[start:start + batch_size], device=device)
        boosted = apply_method(method, hyper, model, classifier, x, y, range(start, start + len(x)), precision)
        quantised = to_uint8(boosted)
        change.append(l2_change(x, to_float(quantised).to(device)).cpu().numpy())
        out.append(quantised)
    return np.concatenate(out), np.concatenate(change)
