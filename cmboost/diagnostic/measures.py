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
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cmboost.files.atomic import atomic_write_text, refuse_existing, refuse_unsafe_output
from cmboost.jcd.attacks import PGD
from cmboost.boosting.methods import boost_with, frozen
from cmboost.boosting.config import DEFAULT_REALNESS, PGD_STEP_FACTOR, step_length
from cmboost.errors import UserInputError
from cmboost.jcd.model import log_prob_from_logits, realness_from_logits
from cmboost.records import check_at_least, check_finite, check_seed, flag_of, shown
from cmboost.runtime import BLOCK_SIZE, autocast
from cmboost.files.samples import to_float, to_uint8
from cmboost.cm.checkpoint import load_cmboost
from cmboost.cm.denoiser import denoise
from cmboost.files.report import auto_scale, image_grid, save_png, upscale

FORMAT = "cmboost.diagnose/1"
JSON_NAME, PNG_NAME = "diagnose.json", "pag.png"
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
    """One generator's labelled samples and how to boost them (a boosting.py method and its record)."""

    name: str
    images: np.ndarray        # uint8 NCHW
    labels: np.ndarray        # int64
    method: str
    hyper: object             # PGDBoost | SGLDBoost | BIGRoCBoost
    source: str = ""


# ----------------------------------------------------------------------------- small pieces

def _blocks(n: int, size: int):
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
        for block in _blocks(len(images), batch_size):
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
            for block in _blocks(len(images), batch_size):
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
        for block in _blocks(len(images), batch_size):
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
        for block in _blocks(len(images), batch_size):
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
    for block in _blocks(len(images), batch_size):
        boosted = boost_with(model, images[block], labels[block], method, hyper,
                             range(block.start, block.stop), precision)
        out.append(to_float(to_uint8(boosted)).to(images.device))
    return torch.cat(out)


# ----------------------------------------------------------------------------- the PAG picture

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
        for block in _blocks(len(x0), batch_size):
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

def output_paths(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / JSON_NAME, out_dir / PNG_NAME


def check_outputs(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Before any work: --out is a folder (or free), and its two files are free unless `overwrite`."""
    refuse_unsafe_output(out_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir}: is a file; give a folder for {JSON_NAME} and {PNG_NAME}")
    for path in output_paths(out_dir):
        refuse_existing(path, overwrite)


def select_real(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` indices (all when fewer) drawn with `seed`, in increasing order."""
    if count >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng([int(seed), 0]).permutation(len(labels))[:count])


def diagnose(model: torch.nn.Module, real_images: np.ndarray, real_labels: np.ndarray,
             generators: Sequence[GeneratorSamples] = (), score: Score | None = None,
             settings: DiagnoseSettings = DiagnoseSettings(), realness_kind: str = DEFAULT_REALNESS,
             device: torch.device | str = "cpu", precision: str = "fp32", num_classes: int | None = None,
             real_ids: Sequence[int] | None = None) -> tuple[dict, np.ndarray]:
    """The report (JSON-ready; see REPORT_KEYS) and the PAG grid (uint8) of `model` on uint8 NCHW real
    images (held out from its training) with their labels. `real_images` are used as given: draw the
    subset with `select_real` first; `real_ids` name them in the picture's rows (default: their
    positions). Without a score the alignment section is None."""
    device = torch.device(device)
    bs = settings.batch_size
    num_classes = int(num_classes or getattr(model, "num_classes", 0) or int(real_labels.max()) + 1)
    x_real = to_float(np.ascontiguousarray(real_images)).to(device)
    y_real = torch.as_tensor(real_labels, dtype=torch.long, device=device)

    accuracy = {"clean": clean_accuracy(model, x_real, y_real, bs, precision),
                "robust": robust_accuracy(model, x_real, y_real, settings.attack_eps, settings.attack_steps,
                                          bs, precision),
                "attack": {"norm": "l2", "steps": settings.attack_steps,
                           "step_size": f"{PGD_STEP_FACTOR} * eps / steps", "random_start": False,
                           "objective": "cross-entropy (untargeted)"}}

    real_d, real_p = realness_and_prob(model, x_real, y_real, realness_kind, bs, precision)
    realness = {"kind": realness_kind, "real": {"mean_realness": float(real_d.mean()), "mean_p_y": float(real_p.mean())},
                "generators": {}}
    alignment = None
    if score is not None:
        alignment = {"score": getattr(score, "description", None), "sigmas": list(settings.sigmas),
                     "real": alignment_rows(model, score, x_real, y_real, settings.sigmas, bs, precision),
                     "generators": {}}
    for gen in generators:
        x = to_float(np.ascontiguousarray(gen.images)).to(device)
        y = torch.as_tensor(gen.labels, dtype=torch.long, device=device)
        boosted = boost_images(model, x, y, gen.method, gen.hyper, bs, precision)
        entry = {"source": gen.source, "num": int(len(x)), "method": gen.method,
                 "hyper": dataclasses.asdict(gen.hyper) if dataclasses.is_dataclass(gen.hyper) else dict(gen.hyper),
                 "mean_l2_change": float((boosted - x).flatten(1).norm(dim=1).mean().item())}
        for when, images in (("before", x), ("after", boosted)):
            d, p = realness_and_prob(model, images, y, realness_kind, bs, precision)
            entry[when] = {"auc": rank_auc(real_d, d), "mean_realness": float(d.mean()), "mean_p_y": float(p.mean()),
                           "accuracy": clean_accuracy(model, images, y, bs, precision)}
        realness["generators"][gen.name] = entry
        if score is not None:
            alignment["generators"][gen.name] = {
                when: alignment_rows(model, score, images, y, settings.sigmas, bs, precision)
                for when, images in (("before", x), ("after", boosted))}

    picks = pick_starts(real_labels, settings.pag_rows, settings.seed)
    starts = torch.cat([torch.full((1, *x_real.shape[1:]), GREY, device=device), x_real[picks]])
    targeted, prob = pag_targets(model, starts, num_classes, settings.pag_eps, settings.pag_steps, bs, precision)
    grid = pag_grid(starts.cpu(), targeted.cpu())
    ids = list(range(len(real_labels))) if real_ids is None else [int(i) for i in real_ids]
    rows = ["grey"] + [f"real {ids[i]} (label {int(real_labels[i])})" for i in picks]
    pag = {"png": PNG_NAME, "eps": settings.pag_eps, "steps": settings.pag_steps,
           "step_size": f"{PGD_STEP_FACTOR} * eps / steps", "rows": rows,
           "columns": ["start"] + [f"toward class {k}" for k in range(num_classes)],
           "target_prob": prob.tolist(),
           "mean_target_prob_grey": float(prob[0].mean()),
           "mean_target_prob_real": float(prob[1:].mean()) if len(picks) else None}

    report = {"format": FORMAT, "accuracy": accuracy, "realness": realness, "alignment": alignment, "pag": pag,
              "settings": dataclasses.asdict(settings), "num_real": int(len(x_real)), "num_classes": num_classes,
              "device": str(device), "precision": precision}
    return report, grid


# The top-level keys of diagnose.json; "provenance" (the files read) is the command line's.
REPORT_KEYS = ("format", "provenance", "accuracy", "realness", "alignment", "pag", "settings", "num_real",
               "num_classes", "device", "precision")


def _json_safe(value):
    """NaN and inf become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_diagnosis(out_dir: str | os.PathLike, report: dict, grid: np.ndarray, overwrite: bool = False) -> tuple[Path, Path]:
    """pag.png, then diagnose.json (last: its presence means both are whole). Each atomic."""

    json_path, png_path = output_paths(out_dir)
    check_outputs(out_dir, overwrite)
    save_png(grid, png_path, overwrite=overwrite)
    ordered = {key: report[key] for key in REPORT_KEYS if key in report}
    ordered.update({k: v for k, v in report.items() if k not in ordered})
    atomic_write_text(json_path, json.dumps(_json_safe(ordered), indent=1) + "\n")
    return json_path, png_path


def format_summary(report: dict) -> str:
    """A few lines for the terminal."""
    acc = report["accuracy"]
    lines = [f"clean accuracy {acc['clean']:.3f}; robust (L2 PGD, {acc['attack']['steps']} steps): "
             + ", ".join(f"eps {r['eps']:g} {r['accuracy']:.3f}" for r in acc["robust"])]
    real = report["realness"]["real"]
    lines.append(f"real: mean D ({report['realness']['kind']}) {real['mean_realness']:.3f}, mean p(y|x) {real['mean_p_y']:.3f}")
    for name, gen in report["realness"]["generators"].items():
        b, a = gen["before"], gen["after"]
        lines.append(f"{name} ({gen['method']}): realness AUC {b['auc']:.3f} -> {a['auc']:.3f}, "
                     f"mean p(y|x) {b['mean_p_y']:.3f} -> {a['mean_p_y']:.3f}, L2 change {gen['mean_l2_change']:.3f}")
    if report["alignment"] is not None:
        def fmt(rows):
            return ", ".join(f"sigma {r['sigma']:g} {r['mean']:.3f}" if r["mean"] is not None else f"sigma {r['sigma']:g} n/a"
                             for r in rows)
        lines.append(f"gradient-score cosine, real: {fmt(report['alignment']['real'])}")
        for name, gen in report["alignment"]["generators"].items():
            lines.append(f"  {name} before: {fmt(gen['before'])}; after: {fmt(gen['after'])}")
    pag = report["pag"]
    lines.append(f"PAG (eps {pag['eps']:g}, {pag['steps']} steps): mean p(target) from grey {pag['mean_target_prob_grey']:.3f}"
                 + (f", from real {pag['mean_target_prob_real']:.3f}" if pag["mean_target_prob_real"] is not None else ""))
    return "\n".join(lines)
