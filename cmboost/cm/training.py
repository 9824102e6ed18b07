"""Training small class-conditional models: an EDM teacher, consistency distillation (CD) from it,
consistency training (CT) from scratch, and easy consistency tuning (ECT), consistency training
started from the teacher's weights. The losses and their level schedules are in
cm/losses.py (docs/method.md §5); this module draws their random inputs and runs the loop.

CD starts from the teacher's weights, as in the paper, and keeps an EMA target network; CT's and
ECT's target is the online network itself (ECT uses the teacher only for its initial weights). Every run keeps an EMA of the weights (what is exported and
sampled), saves its whole state every `save_every` iterations in its run folder (a `jobs.Job`:
state.safetensors, log.jsonl, settings in config.json), and resumes from it when the same command
is rerun. With a time budget (`max_minutes`) a run stops at an
iteration boundary once the budget is spent, saving its state and exporting its model there. Under
torchrun, each rank draws its own batches and DDP averages gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmboost.cm.checkpoint import load_model, save_model, unet_from_config
from cmboost.cm.denoiser import CM_PRECOND, EDM_PRECOND, SIGMA_MAX, SIGMA_MIN
from cmboost.cm.losses import cd_loss, ct_level_probs, ct_loss, ct_num_scales, ect_loss, ect_stage, edm_loss
from cmboost.cm.train_config import ECT_SAMPLER, FMNIST_SIZE, LoopSettings, TrainCMRun, TrainSettings
from cmboost.errors import UserInputError
from cmboost.files.datasets import load_dataset
from cmboost.jobs.job import MODEL_FILE, Job
from cmboost.jobs.training_state import TrainingState
from cmboost.records import field_default
from cmboost.runtime import (DistInfo, all_finite, autocast, barrier, dist_info, init_distributed, on_every_rank,
                             print0, resolve_device, resolve_precision, sample_seed)

# ----------------------------------------------------------------------------- the trainer

def _ema_update(target: torch.nn.Module, source: torch.nn.Module, rate: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s.detach().to(t.dtype), 1.0 - rate)  # t <- rate t + (1 - rate) s
        for t, s in zip(target.buffers(), source.buffers()):
            t.copy_(s)


class Trainer:
    """Holds the networks, optimiser and data for one run; `step(k)` does iteration k."""

    def __init__(self, settings: TrainSettings, images: np.ndarray, labels: np.ndarray | None,
                 device: torch.device, precision: str = "fp32", info: DistInfo | None = None):
        self.settings, self.device, self.precision = settings, device, precision
        self.info = info or DistInfo()
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 NCHW, converted per batch
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.teacher = None
        teacher_weights = None
        if settings.mode in ("cd", "ect"):
            teacher = load_model(settings.teacher)
            if teacher.kind != "edm":
                raise UserInputError(f"--teacher {settings.teacher}: is a {teacher.kind} model, "
                                     f"{settings.mode.upper()} needs an EDM teacher")
            settings.unet = dict(teacher.config["unet"])
            teacher_weights = teacher.net.state_dict()
            if settings.mode == "cd":  # ECT needs the teacher's weights only, not the network
                self.teacher = teacher.net.to(device).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
            torch.manual_seed(settings.seed)
            self.net = unet_from_config(settings.unet).to(device)
        if teacher_weights is not None and (settings.init_from_teacher or settings.mode == "ect"):
            self.net.load_state_dict(teacher_weights)  # CD starts from the teacher; ECT always does
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.target = copy.deepcopy(self.net).eval().requires_grad_(False) if settings.mode == "cd" else None
        self.model = self.net
        if self.info.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=settings.lr)
        self.iteration = 0

    # -- one iteration's random draws: a generator per (seed, iteration, rank), so resuming is exact
    def _generator(self, iteration: int, salt: int = 0) -> torch.Generator:
        index = (iteration * self.info.world_size + self.info.rank) * 2 + salt
        return torch.Generator().manual_seed(sample_seed(self.settings.seed, index))

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.randint(len(self.images), (self.settings.batch_size,), generator=gen)
        x = self.images[idx].to(self.device).float() / 127.5 - 1.0
        y = None if self.labels is None or self.net.num_classes is None else self.labels[idx].to(self.device)
        return x, y

    def num_scales_at(self, iteration: int) -> int:
        """The curriculum's position at an iteration: CT's number of levels, ECT's stage a."""
        s = self.settings
        if s.mode == "ct":
            return ct_num_scales(iteration, s.iters, s.start_scales, s.end_scales)
        if s.mode == "ect":
            return ect_stage(iteration, -(-s.iters // s.ect_stages))
        return s.num_scales

    def loss(self, net: Callable, x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator,
             num_scales: int) -> torch.Tensor:
        """The mode's mean loss on (x, y) with noise levels and noise drawn from `gen`."""
        s, b = self.settings, x.shape[0]
        noise = torch.randn(x.shape, generator=gen).to(self.device)
        if s.mode == "edm":
            sigma = torch.exp(s.p_mean + s.p_std * torch.randn(b, generator=gen)).to(self.device)
            per_sample = edm_loss(net, x, y, sigma, noise)
        elif s.mode == "cd":
            n = torch.randint(num_scales - 1, (b,), generator=gen).to(self.device)
            per_sample = cd_loss(net, self.target, self.teacher, x, y, n, noise, num_scales, s.distance)
        elif s.mode == "ect":
            t = torch.exp(s.ct_p_mean + s.ct_p_std * torch.randn(b, generator=gen)).clamp(SIGMA_MIN, SIGMA_MAX)
            per_sample = ect_loss(net, x, y, t.to(self.device), noise, num_scales, s.ect_q, s.distance)
        else:
            probs = ct_level_probs(num_scales, s.ct_p_mean, s.ct_p_std)
            i = torch.multinomial(probs, b, replacement=True, generator=gen).to(self.device)
            per_sample = ct_loss(net, x, y, i, noise, num_scales, s.distance)
        return per_sample.float().mean()

    def step(self) -> float:
        s, k = self.settings, self.iteration
        gen = self._generator(k)
        x, y = self.batch(gen)
        lr = s.lr * min(1.0, (k + 1) / s.warmup) if s.warmup > 0 else s.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.net.train()
        with autocast(self.device, self.precision):
            loss = self.loss(self.model, x, y, gen, self.num_scales_at(k))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), s.grad_clip)
        self.opt.step()
        # EMA with a warm-up (rate grows to ema_rate) so short runs are not dominated by the init
        _ema_update(self.ema, self.net, min(s.ema_rate, (1 + k) / (10 + k)))
        if self.target is not None:
            _ema_update(self.target, self.net, s.target_ema)
        self.iteration += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor | None, seed: int, num_scales: int | None = None,
                 use_ema: bool = False) -> float:
        """The loss on a fixed batch with fixed draws (for checking that training helps)."""
        net = self.ema if use_ema else self.net
        net.eval()
        gen = torch.Generator().manual_seed(seed)
        with autocast(self.device, self.precision):
            return float(self.loss(net, x.to(self.device), None if y is None else y.to(self.device), gen,
                                   num_scales or self.num_scales_at(self.iteration)))

    # -- state
    def training_state(self) -> TrainingState:
        modules = {"net": self.net, "ema": self.ema, **({"target": self.target} if self.target is not None else {})}
        return TrainingState(modules, self.opt)

    def save_state(self, job: Job) -> None:
        self.training_state().save(job, self.iteration)

    def load_state(self, job: Job) -> bool:
        """Restores the job's saved state; False when it has none."""
        step = self.training_state().load(job)
        if step is None:
            return False
        self.iteration = step
        return True

    def export(self, path: Path) -> Path:
        """The EMA weights plus the config `cmboost sample` needs."""
        s = self.settings
        if s.mode == "edm":
            ts, n, precond = None, None, EDM_PRECOND
        elif s.mode == "ect":
            (ts, n), precond = ECT_SAMPLER, CM_PRECOND
        else:
            n = s.num_scales if s.mode == "cd" else s.end_scales + 1
            ts, precond = (0, round(0.55 * (n - 1)), n - 1), CM_PRECOND  # like OpenAI's 0,22,39 of 40
        extra = {"iterations": self.iteration, "train": {k: v for k, v in dataclasses.asdict(s).items() if k != "unet"}}
        kind = "ct" if s.mode == "ect" else s.mode  # ECT is consistency training: it samples as CT
        return save_model(path, self.ema, kind, s.unet, precond, ts, n, extra)


# ----------------------------------------------------------------------------- the loop

def resumable_changes(settings: TrainSettings) -> set[str]:
    """Settings a rerun may change without starting a new run."""
    allowed = {"iters"} if settings.mode not in ("ct", "ect") else set()  # their curricula depend on iters
    if settings.mode in ("cd", "ect"):
        allowed.add("unet")  # taken from the teacher
    if settings.mode != "ect":
        allowed |= {"ect_q", "ect_stages"}  # unread outside ECT (and absent from runs made before it)
    return allowed


def wall_clock() -> float:
    """Seconds on a clock that only moves forward: what --max-minutes is measured with."""
    return time.monotonic()


def train(settings: TrainSettings, run_dir: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None,
          device: torch.device, precision: str = "fp32",
          save_every: int = field_default(LoopSettings, "save_every"),
          log_every: int = field_default(LoopSettings, "log_every"), progress: bool = True,
          max_minutes: float | None = field_default(LoopSettings, "max_minutes"),
          clock: Callable[[], float] | None = None) -> Path:
    """Trains until settings.iters, resuming from run_dir/state.safetensors; returns run_dir/model.safetensors.

    With `max_minutes`, this invocation stops at the first iteration boundary once that much wall
    time has passed since it began (`clock`, in seconds, read once at the start and once after each
    iteration; wall_clock by default): the state is saved and the model exported there, and the
    same command, with or without the budget, resumes."""
    loop = LoopSettings(save_every, log_every, max_minutes)  # bad values fail before anything is read or written
    clock = clock or wall_clock
    began = clock()
    run_dir = Path(run_dir)
    info = dist_info()
    with Job(run_dir, dataclasses.asdict(settings), may_change=sorted(resumable_changes(settings)),
             name=f"--run-dir {run_dir}", fresh="use a new --run-dir", as_flags=True) as job:
        trainer = Trainer(settings, images, labels, device, precision, info)  # a bad --teacher leaves no folder
        return _train_loop(job, trainer, settings, device, loop, progress, clock, began)


def _train_loop(job: Job, trainer: "Trainer", settings: TrainSettings, device: torch.device, loop: LoopSettings,
                progress: bool, clock: Callable[[], float], began: float) -> Path:
    info = dist_info()
    save_every, log_every, max_minutes = loop.save_every, loop.log_every, loop.max_minutes
    run_dir, state_path, model_path = job.folder, job.state_path, job.folder / MODEL_FILE
    if trainer.load_state(job):
        print0(f"resuming {run_dir} at iteration {trainer.iteration}/{settings.iters}")
    if trainer.iteration >= settings.iters:
        if info.is_main and not model_path.is_file():
            trainer.export(model_path)
        print0(f"{run_dir}: already trained for {trainer.iteration} iterations; model in {model_path}")
        return model_path

    bar = None
    if progress and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=settings.iters, initial=trainer.iteration, desc=f"train-cm {settings.mode}",
                   mininterval=5.0, dynamic_ncols=True)
    window, start = [], time.time()
    curriculum = "stage" if settings.mode == "ect" else "num_scales"  # what log.jsonl calls num_scales_at's value
    last_saved = trainer.iteration if state_path.is_file() else None
    while trainer.iteration < settings.iters:
        window.append(trainer.step())
        k = trainer.iteration
        if not on_every_rank(math.isfinite(window[-1]) and all_finite(trainer.net.parameters()), device):
            # nothing more is written: state.safetensors keeps the last good state, log.jsonl stays JSON
            what = (f"the loss is {window[-1]}" if not math.isfinite(window[-1]) else "the weights hold NaN or inf")
            kept = (f"{state_path} keeps the last good state (iteration {last_saved})" if last_saved is not None
                    else "no state had been saved yet")
            raise UserInputError(f"--run-dir {run_dir}: {what} at iteration {k}; training stopped and {kept}. "
                                 f"Lower --lr (now {settings.lr:g}) and start again in a new --run-dir")
        if bar is not None:
            bar.update(1)
        if k % log_every == 0 or k == settings.iters:
            record = {"iter": k, "loss": float(np.mean(window)), curriculum: trainer.num_scales_at(k - 1),
                      "lr": trainer.opt.param_groups[0]["lr"], "sec_per_iter": (time.time() - start) / len(window)}
            if info.is_main:
                job.append_log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4g}", N=record[curriculum])
            window, start = [], time.time()
        if k % save_every == 0 or k == settings.iters:
            if info.is_main:
                trainer.save_state(job)
                trainer.export(model_path)
            barrier()
            last_saved = k
        if max_minutes is not None and k < settings.iters:
            elapsed = clock() - began
            # every rank stops at the same iteration: one that stopped alone would leave the others waiting
            if not on_every_rank(elapsed < 60 * max_minutes, device):
                if last_saved != k:
                    if info.is_main:
                        if window:  # the iterations since the last record, so the log misses none
                            job.append_log({"iter": k, "loss": float(np.mean(window)),
                                            curriculum: trainer.num_scales_at(k - 1),
                                            "lr": trainer.opt.param_groups[0]["lr"],
                                            "sec_per_iter": (time.time() - start) / len(window)})
                        trainer.save_state(job)
                        trainer.export(model_path)
                    barrier()
                if bar is not None:
                    bar.close()
                print0(f"{run_dir}: stopped at iteration {k}/{settings.iters}, the --max-minutes {max_minutes:g} "
                       f"budget spent ({elapsed / 60:.1f} min); state saved and model exported to {model_path}; "
                       f"rerun the same command to resume")
                return model_path
    if bar is not None:
        bar.close()
    print0(f"{run_dir}: trained {settings.mode} for {trainer.iteration} iterations; model in {model_path}")
    return model_path


def train_cm(run: TrainCMRun) -> Path:
    """`cmboost train-cm`: reads the train split of `run.settings.data` (Fashion-MNIST zero-padded to
    FMNIST_SIZE), completes the settings' `unet` from the data and `run.shape` (a CD or ECT run takes its
    UNet from the teacher), and trains in `run.run_dir` (resuming it). Returns the exported model's path."""
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    settings, shape, loop = run.settings, run.shape, run.loop
    data = settings.data
    padded = FMNIST_SIZE if data.startswith(("fmnist", "fashion-mnist")) else None
    images, labels, num_classes = load_dataset(data, "train", data_dir=run.data_dir, image_size=padded)
    if images.shape[2] != images.shape[3] or images.shape[2] % 2 ** (len(shape.channel_mult) - 1):
        raise UserInputError(f"--data {data}: images are {images.shape[2]}x{images.shape[3]}; need square sizes "
                             f"divisible by 2^(levels-1)")
    settings = dataclasses.replace(settings, unet=shape.config(images.shape[2], images.shape[1], num_classes))
    init_distributed(device)
    return train(settings, run.run_dir, images, labels, device, precision, save_every=loop.save_every,
                 log_every=loop.log_every, progress=run.progress, max_minutes=loop.max_minutes)
