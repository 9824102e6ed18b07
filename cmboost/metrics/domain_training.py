"""Training a domain feature network: its settings, augmentation, the (optionally adversarial) loop and its
held-out accuracy."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cmboost.boosting.config import step_length
from cmboost.errors import UserInputError
from cmboost.jcd.attacks import PGD
from cmboost.jobs.job import Job
from cmboost.jobs.training_state import TrainingState
from cmboost.metrics.domain_net import DEFAULT_SEED, DomainNet, DomainNetConfig, prepare_images
from cmboost.records import check_above, check_at_least, check_finite, check_seed, field_default
from cmboost.runtime import autocast, sample_seed

# TrainSettings fields that train-features has no flag for: messages name them as fields.
SETTINGS_FLAGS = {name: f"TrainSettings.{name}" for name in ("weight_decay", "warmup_steps", "max_shift")}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How a domain net is trained (train-features reads its flags' defaults here); checked when built."""
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    max_shift: int = 2          # random translation in pixels (zero fill)
    hflip: bool = True          # clothes are left-right symmetric; not for digits or text
    seed: int = DEFAULT_SEED
    adv_eps: float = 0.0        # > 0: adversarial training (Madry et al.) in this L2 radius, [0, 1] pixels
    adv_steps: int = 3          # PGD steps of that attack, each boosting.config.step_length(adv_eps, adv_steps) long

    def __post_init__(self):
        check_finite(self, SETTINGS_FLAGS)
        check_at_least(self, 1, ("epochs", "batch_size"))
        check_at_least(self, 0, ("weight_decay", "warmup_steps", "max_shift", "adv_eps"), SETTINGS_FLAGS)
        check_at_least(self, 1, ("adv_steps",))
        check_above(self, 0, ("lr",))
        check_seed(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def config_for_data(images_u8: np.ndarray, num_classes: int, dataset: str,
                    arch: str = field_default(DomainNetConfig, "arch")) -> DomainNetConfig:
    """Config for uint8 NCHW training images: padded up to a multiple of 16, mean/std measured."""
    c, h, w = images_u8.shape[1:]
    if h != w:
        raise UserInputError(f"--data {dataset}: images are {h}x{w}; the domain net needs square images")
    size = int(math.ceil(h / 16) * 16)
    sample = images_u8[:: max(1, len(images_u8) // 10000)].astype(np.float64) / 255.0
    pad_fraction = 1.0 - (h * w) / (size * size)  # zero padding lowers mean and raises spread
    mean = sample.mean() * (1.0 - pad_fraction)
    var = (sample ** 2).mean() * (1.0 - pad_fraction) - mean ** 2
    return DomainNetConfig(in_channels=int(c), image_size=size, pad_from=int(h) if size != h else None,
                           num_classes=int(num_classes), mean=round(float(mean), 4),
                           std=round(float(math.sqrt(max(var, 1e-8))), 4), dataset=dataset, arch=arch)


def _lr_at(step: int, total: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 0 (a pure function of the step, so resume is exact)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _augment(x: torch.Tensor, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to max_shift pixels (zero fill) and horizontal flips, drawn from `gen`."""
    n, _, h, w = x.shape
    if settings.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    m = settings.max_shift
    if m > 0:
        dy = torch.randint(-m, m + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(-m, m + 1, (n,), generator=gen).to(x.device)
        padded = F.pad(x, (m, m, m, m))
        rows = (torch.arange(h, device=x.device).view(1, h) + m + dy.view(n, 1)).view(n, 1, h, 1)
        cols = (torch.arange(w, device=x.device).view(1, w) + m + dx.view(n, 1)).view(n, 1, 1, w)
        index = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = padded[index, channel, rows, cols]
    return x


def train_domain_net(images_u8: np.ndarray, labels: np.ndarray, config: DomainNetConfig,
                     settings: TrainSettings = TrainSettings(), device: torch.device | str = "cpu",
                     precision: str = "fp32", job_folder: str | os.PathLike | None = None,
                     log: Callable[[str], None] | None = print) -> DomainNet:
    """Cross-entropy training (AdamW, warm-up + cosine) on uint8 NCHW `images_u8`.

    With `job_folder`, the training is a `jobs.Job` there: the model and optimizer are saved after
    every epoch and a rerun resumes from the last finished epoch (refusing a folder of a run with
    other settings). The caller's global RNG state is left as it was."""
    device = torch.device(device)
    if len(images_u8) != len(labels) or len(images_u8) == 0:
        raise UserInputError(f"training data: {len(images_u8)} images for {len(labels)} labels")
    with contextlib.ExitStack() as stack:
        job = None
        if job_folder is not None:
            job = stack.enter_context(Job(job_folder, {"config": json.loads(config.to_json()),
                                                       "settings": json.loads(settings.to_json()),
                                                       "n": int(len(images_u8))}))
        stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
        return _train(images_u8, labels, config, settings, device, precision, job, log)


def _train(images_u8, labels, config, settings, device, precision, job: Job | None, log) -> DomainNet:
    torch.manual_seed(settings.seed)  # initial weights depend on the seed only
    net = DomainNet(config).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(images_u8) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    start_epoch = 0
    training_state = TrainingState({"model": net}, optimizer)
    saved = training_state.load(job) if job is not None else None
    if saved is not None:
        start_epoch = saved
        if log:
            log(f"resuming from {job.state_path} after epoch {start_epoch}")
    images = torch.from_numpy(np.ascontiguousarray(images_u8))
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    for epoch in range(start_epoch, settings.epochs):
        gen = torch.Generator().manual_seed(sample_seed(settings.seed, epoch))
        torch.manual_seed(sample_seed(settings.seed, 1_000_000 + epoch))  # dropout stream of this epoch
        order = torch.randperm(len(images), generator=gen)
        net.train()
        seen, loss_sum, correct, tic = 0, 0.0, 0, time.time()
        for i in range(steps_per_epoch):
            idx = order[i * settings.batch_size : (i + 1) * settings.batch_size]
            x = _augment(prepare_images(images[idx], config), settings, gen).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            y = targets[idx].to(device)
            if settings.adv_eps > 0:
                x = _adversarial(net, x, y, settings, precision)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(epoch * steps_per_epoch + i, total, settings)
            with autocast(device, precision):
                _, logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        if job is not None:
            training_state.save(job, epoch + 1)
        if log:
            log(f"epoch {epoch + 1}/{settings.epochs}: loss {loss_sum / seen:.4f}, "
                f"train accuracy {correct / seen:.4f}, {time.time() - tic:.0f}s")
    return net.eval().to(memory_format=torch.contiguous_format)


def _adversarial(net: DomainNet, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings,
                 precision: str) -> torch.Tensor:
    """The batch moved by L2 PGD on the cross-entropy (no random start, so the run stays a function of
    the seed), with BatchNorm in eval mode so the attack does not update its running statistics."""

    attack = PGD("l2", settings.adv_eps, step_length(settings.adv_eps, settings.adv_steps), settings.adv_steps,
                 precision=precision)
    net.eval()
    try:
        return attack(net, lambda v: F.cross_entropy(net(v)[1].float(), y, reduction="none"), x)
    finally:
        net.train()


@torch.no_grad()
def classify_accuracy(net: DomainNet, images_u8: np.ndarray, labels: np.ndarray, batch_size: int = 512,
                      device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `net` on uint8 NCHW images."""
    net = net.eval().to(device)
    correct = 0
    for start in range(0, len(images_u8), batch_size):
        x = prepare_images(torch.from_numpy(images_u8[start : start + batch_size]), net.config).to(device)
        _, logits = net(x)
        correct += int((logits.argmax(1).cpu() == torch.from_numpy(labels[start : start + batch_size])).sum())
    return correct / max(1, len(images_u8))
