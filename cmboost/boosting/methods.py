"""Refinement of generated images with a joint classifier-discriminator (docs/method.md §4).

Three methods, each a pure function of (model, images in [0, 1], labels, hyperparameters):
- "pgd":    example-specific L2 projected gradient ascent on the joint score, with early stop
            once an example's realness passes a threshold (the paper's method);
- "sgld":   the released procedure, x <- x + a * grad f_y(x) + s * N(0, I), clamp at the end;
- "bigroc": L2 PGD that minimises the cross-entropy of a robust classifier (Ganz & Elad 2022).
The model's parameters are frozen while boosting and its train/eval mode is restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from cmboost.boosting.config import BIGRoCBoost, PGDBoost, SGLDBoost, make_hyper
from cmboost.errors import UserInputError
from cmboost.jcd.attacks import FROM_OBJECTIVE, PGD
from cmboost.jcd.model import log_prob_from_logits, log_realness_from_logits, realness_from_logits
from cmboost.runtime import autocast, randn_per_sample, sample_generators

# ----------------------------------------------------------------------------- scores

def joint_score(logits: torch.Tensor, labels: torch.Tensor, objective: str, realness_kind: str) -> torch.Tensor:
    """Per-example score to maximise, from logits f(x): log D(x,y), log p(y|x), or their sum (docs/method.md §4)."""
    log_p = log_prob_from_logits(logits, labels)
    if objective == "log_prob":
        return log_p
    log_d = log_p if realness_kind == "softmax" else log_realness_from_logits(logits, labels, realness_kind)
    return log_d if objective == "realness" else log_p + log_d


realness = realness_from_logits  # D(x,y) in (0, 1): sigmoid(f_y(x)) or p(y|x)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no parameter gradients for the duration; the caller's state is restored after."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def predicted_labels(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """The model's argmax labels ("PL" in BIGRoC), for samples that come without labels."""
    with frozen(model), torch.no_grad(), autocast(images.device, precision):
        return model.logits(images).float().argmax(1)


@torch.no_grad()
def mean_realness(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, kind: str,
                  batch_size: int = 256, precision: str = "fp32") -> float:
    """Mean D(x,y) over `images`: the early-stop threshold when computed on held-out real images."""
    values = []
    with frozen(model):
        for start in range(0, len(images), batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            with autocast(x.device, precision):
                values.append(realness(model.logits(x), y, kind))
    return torch.cat(values).mean().item()


# ----------------------------------------------------------------------------- the methods

def boost(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, method: str = "pgd",
          indices: Sequence[int] | None = None, precision: str = "fp32", channels_last: bool = False,
          **hyper) -> torch.Tensor:
    """Refines float images in [0, 1] (NCHW) towards "real" for their labels; returns new images.
    `indices` are the samples' global indices (for SGLD's per-sample noise; default 0..B-1).
    `hyper` are the method's hyperparameters (see PGDBoost, SGLDBoost, BIGRoCBoost)."""
    record = make_hyper(method, **hyper)
    return boost_with(model, images, labels, method, record, indices, precision, channels_last)


def boost_with(model, images, labels, method, record, indices=None, precision="fp32", channels_last=False):
    """`boost` with a ready hyperparameter record."""
    if images.ndim != 4:
        raise UserInputError(f"images must be NCHW, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise UserInputError("images contain NaN or inf")
    labels = labels.to(images.device).long()
    if record.steps == 0:
        return images.clone()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with frozen(model):
        if method == "sgld":
            out = _sgld(model, images, labels, record, indices, precision)
        elif method == "pgd":
            out = _pgd(model, images, labels, record, precision, channels_last)
        else:
            out = _bigroc(model, images, labels, record, precision, channels_last)
    return out.contiguous()


def _pgd(model, images, labels, hyper: PGDBoost, precision, channels_last):
    attack = PGD(norm="l2", eps=hyper.eps, step_size=hyper.step, steps=hyper.steps, random_start=False,
                 bounds=(0.0, 1.0), precision=precision, channels_last=channels_last)

    def objective(x, y):  # y: the labels of the rows x holds (PGD drops the rows that stopped)
        logits = model.logits(x)
        score = joint_score(logits, y, hyper.objective, hyper.realness_kind)
        if hyper.threshold is None:
            return score
        # early stop, read off the same forward pass: a row already real enough at x_t takes no step
        return score, realness(logits.detach(), y, hyper.realness_kind) >= hyper.threshold

    return attack(model, objective, images, stop=FROM_OBJECTIVE if hyper.threshold is not None else None,
                  labels=labels)


def _bigroc(model, images, labels, hyper: BIGRoCBoost, precision, channels_last):
    attack = PGD(norm="l2", eps=hyper.eps, step_size=hyper.step, steps=hyper.steps, random_start=False,
                 bounds=(0.0, 1.0), precision=precision, channels_last=channels_last)

    def objective(x):  # maximising log p(y|x) is minimising CE(f(x), y)
        return joint_score(model.logits(x), labels, "log_prob", "softmax")

    return attack(model, objective, images)


def _sgld(model, images, labels, hyper: SGLDBoost, indices, precision):
    indices = range(len(images)) if indices is None else indices
    generators = sample_generators(hyper.seed, indices)
    x = images.detach().clone()
    for _ in range(hyper.steps):
        x.requires_grad_(True)
        with autocast(x.device, precision):
            logits = model.logits(x)
        # Sum, not mean: each image's gradient is its own, whatever the batch size (docs/method.md §4).
        chosen = logits.float().gather(1, labels[:, None]).sum()
        grad, = torch.autograd.grad(chosen, x)
        noise = randn_per_sample(generators, x.shape[1:], device=x.device)
        x = (x.detach() + hyper.step * grad + hyper.noise * noise)  # x <- x + a grad f_y(x) + s N(0, I)
    return x.clamp(0.0, 1.0)
