"""Judge-free diagnostics of a joint network: what it says about itself, with no feature network.

Four readings of one network f (any module mapping images in [0, 1], NCHW, to class logits; a
JointModel for the command line):

1. accuracy: clean, and under untargeted L2 PGD at several radii, on held-out real images;
2. realness: the rank AUC (Mann-Whitney) of D(x, y) on held-out real images against each
   generator's samples, before and after boosting them, with the mean p(y|x) of each set. 0.5 means
   the network cannot tell the sets apart by its own reading;
3. alignment: the cosine between grad_x log p(y|x) and a class-conditional diffusion score
   grad_x log p_sigma(x|y), per image, at several noise levels. Srinivas et al. (NeurIPS 2023, "Which
   models have perceptually-aligned gradients?") call a model's gradients perceptually aligned when
   they agree with this score. The score is an argument (`score(x, sigma, y)`); `load_teacher_score`
   makes one from an EDM teacher by Tweedie's formula, (D(x; sigma, y) - x) / sigma^2;
4. a PAG picture: targeted large-radius L2 PGD from a flat grey image and from real images toward
   every class, as one PNG grid.

Every network call sees fixed blocks of `batch_size` images (image i in block i // batch_size), no
attack starts at random, and the real images and the picture's starting images are drawn from
`seed`: the same inputs and settings give the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cmboost.boosting.config import step_length
from cmboost.boosting.methods import boost_with, frozen
from cmboost.cm.checkpoint import load_cmboost
from cmboost.cm.denoiser import denoise
from cmboost.errors import UserInputError
from cmboost.files.samples import to_float, to_uint8
from cmboost.jcd.attacks import PGD
from cmboost.jcd.model import log_prob_from_logits, realness_from_logits
from cmboost.records import check_at_least, check_finite, check_seed, flag_of, shown
from cmboost.runtime import BLOCK_SIZE, autocast

FORMAT = "cmboost.diagnose/1"
GREY = 0.5              # the PAG picture's flat starting image

Score = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]  # score(x, sigma, y) -> like x


@dataclasses.dataclass(frozen=True)
class DiagnoseSettings:
    """The numbers of a diagnosis (`cmboost diagnose` reads its flags' defaults here), checked when
    built, before anything is loaded."""

    num_real: int = 1000                                   # held-out real images (all when fewer), drawn with seed
    num_samples: int | None = None                         # first images of each generator's file; None: all
    attack_eps: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)   # L2 radii of the robust accuracy
    attack_steps: int = 20                                 # untargeted PGD steps per radius
    sigmas: tuple[float, ...] = (0.1, 0.25, 0.5)           # noise levels of the score (the teacher's units)
    pag_eps: float = 8.0                                   # L2 radius of the PAG picture's targeted PGD
    pag_steps: int = 50                                    # its steps
    pag_rows: int = 4                                      # real starting images of the picture (after the grey one)
    seed: int = 0                                          # draws the real images and the picture's starts (and SGLD noise)
    batch_size: int = BLOCK_SIZE                           # images the networks see together
    threads: int = 0                                       # torch CPU threads; 0: torch's choice

    def __post_init__(self):
        for name in ("attack_eps", "sigmas"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = (value,)
            object.__setattr__(self, name, tuple(float(v) for v in value))
            if not value:
                raise UserInputError(f"{flag_of(name)}: needs at least one value")
        check_finite(self)
        for name in ("attack_eps", "sigmas"):
            if any(not v > 0 for v in getattr(self, name)):
                raise UserInputError(f"{flag_of(name)} {shown(getattr(self, name))}: each must be > 0")
        if not self.pag_eps > 0:
            raise UserInputError(f"--pag-eps {self.pag_eps}: must be > 0")
        check_at_least(self, 1, ("num_real", "num_samples", "attack_steps", "pag_steps", "batch_size"))
        check_at_least(self, 0, ("pag_rows", "threads"))
        check_seed(self)


@dataclasses.dataclass(frozen=True)
class GeneratorSamples:
    """One generator's labelled samples and how to boost them (a boosting/methods.py method and its record)."""

    name: str
    images: np.ndarray        # uint8 NCHW
    labels: np.ndarray        # int64
    method: str
    hyper: object             # PGDBoost | SGLDBoost | BIGRoCBoost
    source: str = ""


# ----------------------------------------------------------------------------- small pieces

def index_blocks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def rank_auc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """P(a positive scores above a negative) + P(tie) / 2: the Mann-Whitney U over the product of the
    set sizes, from mid-ranks (tied values share the mean of their ranks)."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("rank_auc needs at least one value on each side")
    values = np.concatenate([pos, neg])
    if not np.isfinite(values).all():
        raise ValueError("rank_auc: values must be finite")
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Runs of equal values: each gets the mean of the ranks (1-based) it spans.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def summary(values: torch.Tensor | np.ndarray) -> dict:
    """Mean and population std of the finite values, their count, and how many were not finite
    (a cosine with a zero vector is undefined)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if len(finite) else None,
            "std": float(finite.std()) if len(finite) else None,
            "num": int(len(finite)), "undefined": int(len(values) - len(finite))}


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor, batch_size: int = BLOCK_SIZE,
              precision: str = "fp32") -> torch.Tensor:
    """[N, K] float32 logits, block by block."""
    out = []
    with frozen(model):
        for block in index_blocks(len(images), batch_size):
            x = images[block]
            with autocast(x.device, precision):
                out.append(model(x).float())
    return torch.cat(out) if out else torch.zeros(0)


def clean_accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = BLOCK_SIZE,
                   precision: str = "fp32") -> float:
    return (logits_of(model, images, batch_size, precision).argmax(1) == labels).float().mean().item()


def robust_accuracy(model, images: torch.Tensor, labels: torch.Tensor, eps: Sequence[float], steps: int,
                    batch_size: int = BLOCK_SIZE, precision: str = "fp32",
                    bounds: tuple[float, float] = (0.0, 1.0)) -> list[dict]:
    """Per radius, the fraction of images classified correctly both as given and after untargeted L2
    PGD on the cross-entropy (`steps` steps of PGD_STEP_FACTOR * eps / steps, no random start)."""
    clean = logits_of(model, images, batch_size, precision).argmax(1) == labels
    rows = []
    with frozen(model):
        for radius in eps:
            attack = PGD(norm="l2", eps=radius, step_size=step_length(radius, steps), steps=steps,
                         random_start=False, bounds=bounds, precision=precision)
            correct = []
            for block in index_blocks(len(images), batch_size):
                x, y = images[block], labels[block]
                adv = attack(model, lambda z, y=y: -log_prob_from_logits(model(z), y), x)
                with torch.no_grad(), autocast(x.device, precision):
                    correct.append(model(adv).float().argmax(1) == y)
            robust = clean & torch.cat(correct)
            rows.append({"eps": float(radius), "accuracy": robust.float().mean().item()})
    return rows


def input_gradients(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = BLOCK_SIZE,
                    precision: str = "fp32") -> torch.Tensor:
    """grad_x log p(y|x), one per image, float32."""
    out = []
    with frozen(model):
        for block in index_blocks(len(images), batch_size):
            x = images[block].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                with autocast(x.device, precision):
                    logits = model(x)
                # Each image's log-probability depends on that image only: the sum's gradient is per image.
                (grad,) = torch.autograd.grad(log_prob_from_logits(logits, labels[block]).sum(), x)
            out.append(grad.float())
    return torch.cat(out)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine in float64 (tiny gradients of saturated softmaxes keep their direction); NaN where
    either vector is zero."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, (a * b).sum(1) / norms.clamp_min(1e-300), torch.full_like(norms, math.nan))


def gradient_score_cosines(model, score: Score, images: torch.Tensor, labels: torch.Tensor,
                           sigmas: Sequence[float], batch_size: int = BLOCK_SIZE,
                           precision: str = "fp32") -> torch.Tensor:
    """[len(sigmas), N] cosine between grad_x log p(y|x) and score(x, sigma, y) at each image x."""
    grads = input_gradients(model, images, labels, batch_size, precision)
    rows = []
    for sigma in sigmas:
        parts = []
        for block in index_blocks(len(images), batch_size):
            with torch.no_grad():
                s = score(images[block], float(sigma), labels[block])
            if s.shape != images[block].shape:
                raise ValueError(f"score returned shape {tuple(s.shape)} for images {tuple(images[block].shape)}")
            parts.append(cosines(grads[block], s))
        rows.append(torch.cat(parts))
    return torch.stack(rows).cpu()


def alignment_rows(model, score: Score, images: torch.Tensor, labels: torch.Tensor, sigmas: Sequence[float],
                   batch_size: int = BLOCK_SIZE, precision: str = "fp32") -> list[dict]:
    """Per noise level: {"sigma", "mean", "std", "num", "undefined"} of the per-image cosines."""
    cos = gradient_score_cosines(model, score, images, labels, sigmas, batch_size, precision)
    return [{"sigma": float(sigma), **summary(row.numpy())} for sigma, row in zip(sigmas, cos)]


@torch.no_grad()
def realness_and_prob(model, images: torch.Tensor, labels: torch.Tensor, kind: str,
                      batch_size: int = BLOCK_SIZE, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """D(x, y) in the reading `kind` and p(y|x), per image."""
    logits = logits_of(model, images, batch_size, precision)
    realness = realness_from_logits(logits, labels, kind)
    prob = log_prob_from_logits(logits, labels).exp()
    return realness.cpu().double().numpy(), prob.cpu().double().numpy()


def boost_images(model, images: torch.Tensor, labels: torch.Tensor, method: str, hyper,
                 batch_size: int = BLOCK_SIZE, precision: str = "fp32") -> torch.Tensor:
    """Boosted images, rounded to uint8 levels as a boosted sample file holds them; sample i uses
    index i (SGLD's noise stream), block by block."""
    out = []
    for block in index_blocks(len(images), batch_size):
        boosted = boost_with(model, images[block], labels[block], method, hyper,
                             range(block.start, block.stop), precision)
        out.append(to_float(to_uint8(boosted)).to(images.device))
    return torch.cat(out)


# ----------------------------------------------------------------------------- the PAG picture


# ----------------------------------------------------------------------------- the teacher's score

class DenoiserScore:
    """grad_x log p_sigma(x|y) from an EDM denoiser by Tweedie's formula, (D(x; sigma, y) - x) / sigma^2.
    Images come in the joint network's [0, 1] pixels and go to the teacher as 2x - 1; the score is
    returned in [0, 1] pixels (times 2, the chain rule). sigma is in the teacher's [-1, 1] units."""

    def __init__(self, net: torch.nn.Module, precond, precision: str = "fp32", source: str = "an EDM denoiser"):
        self.net, self.precond, self.precision = net, precond, precision
        self.description = f"(D(x; sigma, y) - x) / sigma^2 of {source}, sigma in its [-1, 1] units"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float, y: torch.Tensor) -> torch.Tensor:
        signed = 2.0 * x.float() - 1.0
        with autocast(x.device, self.precision):
            denoised = denoise(self.net, signed, sigma, y, self.precond, clip=False)
        return 2.0 * (denoised.float() - signed) / float(sigma) ** 2


def load_teacher_score(path: str | os.PathLike, device: torch.device, precision: str = "fp32",
                       image_shape: tuple[int, int, int] | None = None,
                       num_classes: int | None = None, flag: str = "--teacher") -> DenoiserScore:
    """The score of a class-conditional EDM teacher (a cmboost .safetensors from `train-cm --mode edm`),
    checked against the joint network's image shape and classes."""

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{flag} {path}: file not found")
    if path.suffix != ".safetensors":
        raise UserInputError(f"{flag} {path}: expected an EDM teacher .safetensors (cmboost train-cm --mode edm)")
    try:
        loaded = load_cmboost(path)
    except UserInputError as err:
        raise UserInputError(f"{flag} {err}") from None
    if loaded.kind != "edm":
        raise UserInputError(f"{flag} {path}: a {loaded.kind} model; the score needs an EDM teacher (a denoiser, "
                             f"cmboost train-cm --mode edm)")
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    if image_shape is not None and shape != tuple(image_shape):
        raise UserInputError(f"{flag} {path}: makes {shape[0]}x{shape[1]}x{shape[2]} images, the network takes "
                             f"{image_shape[0]}x{image_shape[1]}x{image_shape[2]}")
    if num_classes is not None and loaded.num_classes != num_classes:
        have = "is unconditional" if loaded.num_classes is None else f"has {loaded.num_classes} classes"
        raise UserInputError(f"{flag} {path}: {have}, the network {num_classes}; the score must be class-conditional "
                             f"on the same classes")
    return DenoiserScore(loaded.net.to(device).eval(), loaded.precond, precision, source=str(path))


# ----------------------------------------------------------------------------- the whole diagnosis


