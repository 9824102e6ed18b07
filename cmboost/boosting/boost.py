"""Boosting a sample file into another: input checks, resumable sharded batches, a before/after grid."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from cmboost.boosting.config import FLAGS, METHODS, make_hyper
from cmboost.boosting.methods import boost_with, mean_realness, predicted_labels
from cmboost.boosting.settings import (check_settings_network, do_not_boost, load_settings_file, settings_block,
                                       tuned_hyper)
from cmboost.errors import UserInputError
from cmboost.files.atomic import refuse_existing, refuse_output_inside_inputs
from cmboost.files.checkpoints import weights_digest  # a resumed job never mixes parts boosted by another network
from cmboost.files.report import save_before_after_grid
from cmboost.files.samples import load_samples, map_samples, save_samples, to_float, to_uint8
from cmboost.jcd.model import load_joint_model, read_metadata
from cmboost.jobs.config import file_digest
from cmboost.jobs.parts import refuse_finished, run_parts
from cmboost.records import check_seed
from cmboost.runtime import (BLOCK_SIZE, deterministic_kernels, dist_info, init_distributed, print0, resolve_device,
                             resolve_precision)


def check_fits_model(images: np.ndarray, labels: np.ndarray | None, model, source: str) -> None:
    """One clear line when the samples cannot go through the model."""
    c, h, w = images.shape[1:]
    if c != model.in_channels:
        raise UserInputError(f"{source}: images have {c} channels, the model takes {model.in_channels}")
    if (h, w) != (model.image_size, model.image_size):
        raise UserInputError(f"{source}: images are {h}x{w}, the model takes {model.image_size}x{model.image_size}")
    if labels is not None and len(labels) and labels.max() >= model.num_classes:
        raise UserInputError(f"{source}: label {labels.max()} out of range for the model's {model.num_classes} classes")


def resolve_threshold(model, threshold: float | None, threshold_from: str | None, kind: str,
                      device: torch.device, precision: str) -> float | None:
    """The early-stop threshold: given, or the mean realness of held-out real images in a sample file."""
    if threshold is not None and threshold_from is not None:
        raise UserInputError("--threshold and --threshold-from: give one or the other")
    if threshold_from is None:
        return threshold
    real, real_labels = load_samples(threshold_from, num_classes=model.num_classes)
    if real_labels is None:
        raise UserInputError(f"--threshold-from {threshold_from}: needs labels (arr_1)")
    check_fits_model(real, real_labels, model, threshold_from)
    x = to_float(real).to(device)
    value = mean_realness(model, x, torch.as_tensor(real_labels, device=device), kind, precision=precision)
    if not 0 < value < 1:  # D(x, y) lies in (0, 1): a threshold at either end is no early stop
        raise UserInputError(f"--threshold-from {threshold_from}: the mean realness D(x, y) of its images is "
                             f"{value}, outside (0, 1), so it cannot serve as an early-stop threshold; pass "
                             f"--threshold in (0, 1) instead")
    return value


def trained_realness_kind(model_path: str | os.PathLike) -> str | None:
    """The reading of realness a train-jcd network was trained with (in its metadata), if recorded."""
    if not str(model_path).endswith(".safetensors"):
        return None

    return read_metadata(model_path).get("extra", {}).get("realness_kind")


def trained_radius(model_path: str | os.PathLike) -> float | None:
    """The L2 radius of the real-image attack a train-jcd network was adversarially trained at (in its
    metadata), if recorded: the radius it was made robust at, and so the radius it boosts at by default
    (`cmboost diagnose` measures how robust it is there)."""
    if not str(model_path).endswith(".safetensors"):
        return None

    trained = read_metadata(model_path).get("extra", {}).get("train_jcd", {})
    if trained.get("attack_norm") != "l2" or not trained.get("real_eps"):
        return None
    return float(trained["real_eps"])


def with_trained_radius(method: str, hyper: dict, model_path: str | os.PathLike) -> dict:
    """`hyper` with PGD's eps, when not given, set to the radius the network was adversarially trained at:
    beyond it, part of every edit is an adversarial example of the network. Other methods, and networks
    that record no radius, keep PGDBoost's default."""
    if method != "pgd" or "eps" in hyper or not Path(model_path).is_file():
        return hyper
    radius = trained_radius(model_path)
    return hyper if radius is None else {**hyper, "eps": radius}


# ----------------------------------------------------------------------------- the boost verb

DEFAULT_METHOD = "pgd"  # the paper's; a settings file from `cmboost tune` may choose another


@dataclasses.dataclass(frozen=True)
class BoostRun:
    """One `cmboost boost` (and `cmboost.boost`) run, checked when built. `hyper` holds the
    hyperparameters given explicitly (they override a --settings file's tuned values); the rest
    come from the settings file, the network (PGD's radius and reading of realness) or the method's
    record."""

    samples: str
    model: str
    out: str
    method: str | None = None          # None: DEFAULT_METHOD, or the method chosen in `settings`
    hyper: dict = dataclasses.field(default_factory=dict)
    settings: str | None = None        # a `cmboost tune` settings file
    threshold_from: str | None = None  # PGD's early stop at the mean D(x, y) of real images in this file
    labels: str = "file"               # class labels from the sample file, or the network's argmax ("predicted")
    arch: str | None = None            # for checkpoints that do not record their architecture
    compile: bool = False
    grid: bool = True
    seed: int = 0                      # SGLD's noise: sample i uses stream (seed, i)
    batch_size: int = 256              # images per part file; the output does not depend on it
    block_size: int | None = None      # None: the block the settings file was scored with, else BLOCK_SIZE
    allow_other_network: bool = False  # use a settings file tuned for another network (the mismatch is printed)
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        check_seed(self)  # used by sgld only, refused alike for every method
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.block_size is not None and self.block_size < 1:
            raise UserInputError(f"--block-size {self.block_size}: must be at least 1")
        if self.labels not in ("file", "predicted"):
            raise UserInputError(f"--labels {self.labels!r}: choose file or predicted")


@dataclasses.dataclass(frozen=True)
class ResolvedBoost:
    """What a BoostRun comes to once its settings file and network are read."""

    method: str
    record: object
    block_size: int
    device: torch.device
    precision: str
    model: object
    digest: str                       # the weights as loaded: a resumed job never mixes two networks' parts
    other_network: str | None = None  # the settings file was tuned for another network (--allow-other-network)

    def describe(self, run: BoostRun) -> dict:
        described = {"samples": run.samples, "model": run.model, "out": run.out, "method": self.method,
                     "hyper": dataclasses.asdict(self.record), "labels": run.labels, "device": str(self.device),
                     "precision": self.precision, "batch_size": run.batch_size, "block_size": self.block_size,
                     "compile": run.compile}
        return described if self.other_network is None else {**described, "other_network": self.other_network}


def given_hyper(method: str, given: dict, seed: int) -> dict:
    """The hyperparameters given explicitly for `method` (one the method lacks is an error naming its
    flag), with the run's seed for SGLD's noise."""

    fields = {f.name for f in dataclasses.fields(METHODS[method])}
    for name in given:
        if name not in fields:
            raise UserInputError(f"{FLAGS.get(name, name)} does not apply to --method {method}")
    return {**given, "seed": seed} if method == "sgld" else dict(given)


def resolve_boost(run: BoostRun) -> ResolvedBoost:
    """The method, its checked hyperparameters and the loaded network of `run`; bad values fail
    before the network is loaded, and an existing output before it is read."""

    hyper, method, block_size, settings = dict(run.hyper), run.method, run.block_size, None
    if method is not None and method not in METHODS:
        raise UserInputError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if run.settings:
        settings = load_settings_file(run.settings)
        method, tuned = tuned_hyper(settings, method, run.settings)
        if block_size is None:  # the block tune scored the settings with, so the images are the same
            block_size = settings_block(settings)
        if run.threshold_from or hyper.get("threshold") is not None:
            tuned.pop("threshold", None)
        hyper = {**tuned, **hyper}  # a value given explicitly overrides the tuned one
    method = method or DEFAULT_METHOD
    hyper.update(given_hyper(method, run.hyper, run.seed))
    block_size = BLOCK_SIZE if block_size is None else block_size
    hyper = with_trained_radius(method, hyper, run.model)
    if run.threshold_from and method != "pgd":
        raise UserInputError(f"--threshold-from does not apply to --method {method}")
    record = make_hyper(method, **hyper)  # the one validated record: bad values fail before any loading
    refuse_finished(run.out, run.overwrite)  # before loading a network that may take seconds to read
    refuse_output_inside_inputs(run.out, [("the samples", run.samples)])
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    model = load_joint_model(run.model, arch=run.arch)
    digest = weights_digest(model)  # the weights as loaded: torch.compile renames them
    other_network = None
    if settings is not None:
        other_network = check_settings_network(settings, run.settings, run.model, digest, run.allow_other_network)
    model = model.to(device)
    if run.compile:
        model.backbone = torch.compile(model.backbone)
    if method == "pgd":
        # A network trained by train-jcd records which reading of realness its objective trained.
        kind = record.realness_kind if "realness_kind" in hyper else (trained_realness_kind(run.model)
                                                                       or record.realness_kind)
        threshold = resolve_threshold(model, record.threshold, run.threshold_from, kind, device, precision)
        record = dataclasses.replace(record, realness_kind=kind, threshold=threshold)
    return ResolvedBoost(method, record, block_size, device, precision, model, digest, other_network)


def unchanged_reason(run: BoostRun) -> str | None:
    """Why `run` writes its images unchanged: its settings file answers "do not boost" and no
    --method overrides it; None when it boosts."""
    if not run.settings or run.method is not None:
        return None

    return do_not_boost(load_settings_file(run.settings))


def boost(run: BoostRun) -> Path:
    """Boosts the sample file of `run` into its output (resumable); returns the output's path. With a
    settings file that answers "do not boost" (and no --method), the images are written unchanged."""
    reason = unchanged_reason(run)
    if reason is not None:
        return copy_unchanged(run, reason)
    resolved = resolve_boost(run)
    if resolved.other_network is not None:
        print0(f"{resolved.other_network}; used all the same (--allow-other-network)")
    return run_boost(run, resolved)


def run_boost(run: BoostRun, resolved: ResolvedBoost) -> Path:
    """Boosts every image of `run.samples` with the resolved method and network, and writes `run.out`
    (OpenAI .npz) and its before/after grid. Rerunning resumes. The network sees `block_size` images
    at a time; the output depends on it, not on `batch_size`."""
    device, precision, method, record, model = (resolved.device, resolved.precision, resolved.method,
                                                resolved.record, resolved.model)
    init_distributed(device)
    out, grid_path = Path(run.out), Path(run.out).with_suffix(".grid.png")
    if run.grid:  # checked now, not after the whole run, so a leftover grid cannot waste it
        refuse_existing(grid_path, run.overwrite)
    images, labels = map_samples(run.samples)  # memory-mapped: each batch is read when it is boosted
    check_fits_model(images, labels, model, run.samples)
    if run.labels == "file" and labels is None:
        raise UserInputError(f"{run.samples}: has no labels (arr_1); pass --labels predicted to use the model's "
                             f"argmax")
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def process(indices):
        x = to_float(images[indices[0]:indices[-1] + 1].copy(order="C")).to(device)  # off the map, NCHW strides
        if run.labels == "file":
            y = torch.as_tensor(labels[indices[0]:indices[-1] + 1], device=device)
        else:
            y = predicted_labels(model, x, precision)
        boosted = boost_with(model, x, y, method, record, indices, precision, channels_last)
        return to_uint8(boosted), y.cpu().numpy().astype(np.int64)

    config = {"samples": str(Path(run.samples).resolve()), "samples_digest": file_digest(run.samples),
              "model": resolved.digest, "method": method, "hyper": dataclasses.asdict(record),
              "labels": run.labels, "precision": precision, "num_images": len(images)}
    # The blocks fix what is computed together, so a resume may change the batch size.
    with deterministic_kernels(device):
        path = run_parts(out, len(images), run.batch_size, process, config, may_change=("batch_size",),
                         overwrite=run.overwrite, progress=run.progress, desc=f"boost {method}",
                         block_size=resolved.block_size)
    if run.grid and dist_info().is_main:
        save_before_after_grid(images, load_samples(path)[0], grid_path, overwrite=run.overwrite)
    return path


def copy_unchanged(run: BoostRun, reason: str) -> Path:
    """The samples written to run.out as they are (the same image and label bytes), with one line
    that says why: the settings file's answer was "do not boost"."""

    refuse_finished(run.out, run.overwrite)
    refuse_output_inside_inputs(run.out, [("the samples", run.samples)])
    images, labels = load_samples(run.samples)
    if dist_info().is_main:
        save_samples(run.out, images, labels, overwrite=run.overwrite)
        print0(f"--settings {run.settings}: tuning chose not to boost, so {run.out} holds the images unchanged "
               f"({reason.split(':')[0]}; pass --method to boost all the same)")
    return Path(run.out)

