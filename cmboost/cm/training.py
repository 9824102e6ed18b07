"""Training small class-conditional models: an EDM teacher, consistency distillation (CD) from it,
and consistency training (CT) from scratch.

- EDM (Karras et al. 2022): D with Karras preconditioning (nothing subtracted), ln(sigma) ~
  N(P_mean=-1.2, P_std=1.2), loss weight (s^2 + sd^2) / (s sd)^2 on the squared error.
- CD (Song et al. 2023, Alg. 2): N Karras levels t_1 < ... < t_N; n uniform; x_{n+1} = x + t_{n+1} z;
  one Heun step of the teacher ODE dx/dt = (x - D_teacher(x, t)) / t from t_{n+1} to t_n gives
  x_hat_n; loss d(f(x_{n+1}, t_{n+1}), f_target(x_hat_n, t_n)) with f_target an EMA (mu) of f.
  f starts from the teacher's weights, as in the paper.
- CT, improved-CT style (Song & Dhariwal 2023): N(k) = min(s0 2^floor(k/K'), s1) + 1 levels,
  K' = floor(K / (log2(floor(s1/s0)) + 1)); level index i drawn from a discretised log-normal
  (P_mean -1.1, P_std 2.0); the same z at both levels; target = stop-grad of the online network
  (no EMA target); weight 1 / (t_{i+1} - t_i); pseudo-Huber distance c = 0.00054 sqrt(dim).

Every run keeps an EMA of the weights (what is exported and sampled), saves its whole state
every `save_every` iterations to run_dir/state.safetensors, and resumes from it when the same
command is rerun. Under torchrun, each rank draws its own batches and DDP averages gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cmboost.atomic import atomic_open
from cmboost.checkpoints import read_safetensors, save_safetensors
from cmboost.cm.checkpoint import load_model, save_model, unet_from_config
from cmboost.cm.denoiser import (CM_PRECOND, EDM_PRECOND, RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, denoise)
from cmboost.cm.unet import attention_rates
from cmboost.errors import UserInputError
from cmboost.runtime import DistInfo, autocast, barrier, dist_info, print0, sample_seed

MODES = ("edm", "cd", "ct")
DISTANCES = ("l2", "pseudo-huber")
STATE_FILE, MODEL_FILE, SETTINGS_FILE, LOG_FILE = "state.safetensors", "model.safetensors", "settings.json", "log.jsonl"


def small_unet_config(image_size: int = 32, in_channels: int = 1, num_classes: int | None = 10,
                      model_channels: int = 32, channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                      attention_resolutions: tuple[int, ...] = (8,), dropout: float = 0.0,
                      num_head_channels: int = 32) -> dict:
    """A small ADM UNet for 32x32 single-channel data; `attention_resolutions` in pixels (8 = at 8x8)."""
    return dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                out_channels=in_channels, num_res_blocks=num_res_blocks,
                attention_resolutions=list(attention_rates(attention_resolutions, image_size)), dropout=dropout,
                channel_mult=list(channel_mult), num_classes=num_classes, num_heads=1,
                num_head_channels=num_head_channels, use_scale_shift_norm=True, resblock_updown=True)


@dataclasses.dataclass
class TrainSettings:
    """Everything that defines a run (saved in run_dir/settings.json; a rerun must match)."""

    mode: str
    iters: int
    unet: dict
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 100                 # linear lr warm-up iterations
    grad_clip: float = 1.0
    ema_rate: float = 0.999           # EMA of the weights that gets exported
    seed: int = 0
    # EDM
    p_mean: float = -1.2
    p_std: float = 1.2
    # CD
    teacher: str | None = None
    num_scales: int = 18
    target_ema: float = 0.95
    init_from_teacher: bool = True
    # CT
    start_scales: int = 10
    end_scales: int = 160
    ct_p_mean: float = -1.1
    ct_p_std: float = 2.0
    distance: str = "l2"
    data: str = "fmnist"

    def check(self) -> None:
        if self.mode not in MODES:
            raise UserInputError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.iters < 1:
            raise UserInputError(f"--iters {self.iters}: must be at least 1")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.lr <= 0:
            raise UserInputError(f"--lr {self.lr}: must be positive")
        if not 0 <= self.ema_rate < 1 or not 0 <= self.target_ema < 1:
            raise UserInputError("--ema-rate and --target-ema must lie in [0, 1)")
        if self.distance not in DISTANCES:
            raise UserInputError(f"--distance {self.distance!r}: choose one of {', '.join(DISTANCES)}")
        if self.mode == "cd" and not self.teacher:
            raise UserInputError("--mode cd needs --teacher (an EDM model.safetensors from 'cmboost train-cm --mode edm')")
        if self.mode == "cd" and self.num_scales < 2:
            raise UserInputError(f"--num-scales {self.num_scales}: needs at least 2")
        if self.mode == "ct" and not 2 <= self.start_scales <= self.end_scales:
            raise UserInputError("--start-scales and --end-scales: need 2 <= start <= end")


# ----------------------------------------------------------------------------- schedules and distances

def karras_levels(num_levels: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """Ascending levels t_1 = sigma_min < ... < t_N = sigma_max (the CM papers' indexing), float64."""
    i = torch.arange(num_levels, dtype=torch.float64)
    a, b = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (a + i / (num_levels - 1) * (b - a)) ** rho


def ct_num_scales(iteration: int, total_iters: int, start: int, end: int) -> int:
    """iCT's exponential curriculum: N(k) = min(s0 * 2^floor(k / K'), s1) + 1."""
    stages = math.floor(math.log2(max(end // start, 1))) + 1
    per_stage = max(total_iters // stages, 1)
    return min(start * 2 ** (iteration // per_stage), end) + 1


def ct_level_probs(num_levels: int, p_mean: float, p_std: float) -> torch.Tensor:
    """p(i) ∝ erf((ln t_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln t_i - P_mean)/(sqrt2 P_std)), i over N-1 pairs."""
    log_t = torch.log(karras_levels(num_levels))
    cdf = torch.erf((log_t - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return p / p.sum()


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance: mean squared error ("l2") or pseudo-Huber sqrt(|a-b|^2 + c^2) - c, c = 0.00054 sqrt(dim)."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return torch.sqrt(diff.pow(2).sum(1) + c * c) - c


# ----------------------------------------------------------------------------- losses (per sample)

def edm_loss(net: Callable, x: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """lambda(s) |D(x + s n, s) - x|^2 with lambda = (s^2 + sd^2) / (s sd)^2 (Karras 2022, eq. 8 and Table 1)."""
    denoised = denoise(net, x + sigma.view(-1, 1, 1, 1) * noise, sigma, labels, EDM_PRECOND)
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    return weight * (denoised - x).pow(2).flatten(1).mean(1)


def heun_step(teacher: Callable, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
              labels: torch.Tensor | None) -> torch.Tensor:
    """One Heun step of the probability-flow ODE dx/dt = (x - D(x, t)) / t from t_from to t_to (per sample)."""
    shape = (-1, 1, 1, 1)
    d = (x - denoise(teacher, x, t_from, labels, EDM_PRECOND)) / t_from.view(shape)
    x_euler = x + (t_to - t_from).view(shape) * d
    d_next = (x_euler - denoise(teacher, x_euler, t_to, labels, EDM_PRECOND)) / t_to.view(shape)
    return x + (t_to - t_from).view(shape) * 0.5 * (d + d_next)


def cd_loss(net: Callable, target: Callable, teacher: Callable, x: torch.Tensor, labels: torch.Tensor | None,
            n: torch.Tensor, noise: torch.Tensor, num_scales: int, dist: str) -> torch.Tensor:
    """d(f(x_{n+1}, t_{n+1}), f_target(Heun_teacher(x_{n+1}: t_{n+1} -> t_n), t_n)); n indexes ascending levels 0..N-2."""
    levels = karras_levels(num_scales).to(x.device, torch.float32)
    t_cur, t_next = levels[n], levels[n + 1]
    x_next = x + t_next.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        x_hat = heun_step(teacher, x_next, t_next, t_cur, labels)
        target_out = denoise(target, x_hat, t_cur, labels, CM_PRECOND)
    online = denoise(net, x_next, t_next, labels, CM_PRECOND)
    return distance(online, target_out.float(), dist)


def ct_loss(net: Callable, x: torch.Tensor, labels: torch.Tensor | None, i: torch.Tensor, noise: torch.Tensor,
            num_scales: int, dist: str) -> torch.Tensor:
    """(1 / (t_{i+1} - t_i)) d(f(x + t_{i+1} z, t_{i+1}), sg f(x + t_i z, t_i)) (improved CT)."""
    levels = karras_levels(num_scales).to(x.device, torch.float32)
    t_cur, t_next = levels[i], levels[i + 1]
    with torch.no_grad():
        target_out = denoise(net, x + t_cur.view(-1, 1, 1, 1) * noise, t_cur, labels, CM_PRECOND)
    online = denoise(net, x + t_next.view(-1, 1, 1, 1) * noise, t_next, labels, CM_PRECOND)
    return distance(online, target_out.float(), dist) / (t_next - t_cur)


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
        settings.check()
        self.settings, self.device, self.precision = settings, device, precision
        self.info = info or DistInfo()
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 NCHW, converted per batch
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.teacher = None
        if settings.mode == "cd":
            teacher = load_model(settings.teacher)
            if teacher.kind != "edm":
                raise UserInputError(f"--teacher {settings.teacher}: is a {teacher.kind} model, CD needs an EDM teacher")
            self.teacher = teacher.net.to(device).eval().requires_grad_(False)
            settings.unet = dict(teacher.config["unet"])
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
            torch.manual_seed(settings.seed)
            self.net = unet_from_config(settings.unet).to(device)
        if self.teacher is not None and settings.init_from_teacher:
            self.net.load_state_dict(self.teacher.state_dict())  # CD starts from the teacher
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
        s = self.settings
        if s.mode == "ct":
            return ct_num_scales(iteration, s.iters, s.start_scales, s.end_scales)
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
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        if self.target is not None:
            tensors.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        for idx, state in self.opt.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value)
        return tensors

    def save_state(self, path: Path) -> None:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.state_dict()["param_groups"]]
        meta = {"iteration": str(self.iteration), "opt_groups": json.dumps(groups),
                "settings": json.dumps(dataclasses.asdict(self.settings))}
        save_safetensors(path, self.state_tensors(), meta)

    def load_state(self, path: Path) -> None:
        tensors, meta = read_safetensors(path)
        try:
            self.iteration = int(meta["iteration"])
            groups = json.loads(meta["opt_groups"])
        except (KeyError, ValueError) as err:
            raise UserInputError(f"{path}: damaged training state ({err})") from None

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.net.load_state_dict(part("net."))
        self.ema.load_state_dict(part("ema."))
        if self.target is not None:
            self.target.load_state_dict(part("target."))
        opt_state: dict = {}
        for key, value in part("opt.").items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value.to(self.device) if name != "step" else value
        ref = self.opt.state_dict()
        for g, saved in zip(ref["param_groups"], groups):
            saved["params"] = g["params"]
        self.opt.load_state_dict({"state": opt_state, "param_groups": groups})

    def export(self, path: Path) -> Path:
        """The EMA weights plus the config `cmboost sample` needs."""
        s = self.settings
        if s.mode == "edm":
            ts, n, precond = None, None, EDM_PRECOND
        else:
            n = s.num_scales if s.mode == "cd" else s.end_scales + 1
            ts, precond = (0, round(0.55 * (n - 1)), n - 1), CM_PRECOND  # like OpenAI's 0,22,39 of 40
        extra = {"iterations": self.iteration, "train": {k: v for k, v in dataclasses.asdict(s).items() if k != "unet"}}
        return save_model(path, self.ema, s.mode, s.unet, precond, ts, n, extra)


# ----------------------------------------------------------------------------- the loop

# Settings a rerun may change without starting a new run.
_RESUMABLE_CHANGES = {"iters"}


def _check_same_run(run_dir: Path, settings: TrainSettings) -> None:
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: damaged ({err})") from None
    current = dataclasses.asdict(settings)
    allowed = set(_RESUMABLE_CHANGES) if settings.mode != "ct" else set()  # CT's curriculum depends on iters
    if settings.mode == "cd":
        allowed.add("unet")  # taken from the teacher
    for key, value in current.items():
        if key in allowed:
            continue
        value, old = json.loads(json.dumps(value)), saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value != old:
            sub = sorted(k for k in set(value) | set(old) if value.get(k) != old.get(k))[0]
            key, value, old = f"{key}.{sub}", value.get(sub), old.get(sub)
        if value != old:
            raise UserInputError(f"--run-dir {run_dir}: holds a run with {key}={old!r}, not {value!r}; "
                                 f"rerun with the same settings to resume, or use a new --run-dir")


def _write_json(path: Path, obj: dict) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def train(settings: TrainSettings, run_dir: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None,
          device: torch.device, precision: str = "fp32", save_every: int = 500, log_every: int = 50,
          progress: bool = True) -> Path:
    """Trains until settings.iters, resuming from run_dir/state.safetensors; returns run_dir/model.safetensors."""
    run_dir = Path(run_dir)
    info = dist_info()
    settings.check()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    _check_same_run(run_dir, settings)
    trainer = Trainer(settings, images, labels, device, precision, info)
    state_path, model_path = run_dir / STATE_FILE, run_dir / MODEL_FILE
    if state_path.is_file():
        trainer.load_state(state_path)
        print0(f"resuming {run_dir} at iteration {trainer.iteration}/{settings.iters}")
    elif info.is_main:
        _write_json(run_dir / SETTINGS_FILE, dataclasses.asdict(settings))
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
    while trainer.iteration < settings.iters:
        window.append(trainer.step())
        k = trainer.iteration
        if bar is not None:
            bar.update(1)
        if k % log_every == 0 or k == settings.iters:
            record = {"iter": k, "loss": float(np.mean(window)), "num_scales": trainer.num_scales_at(k - 1),
                      "lr": trainer.opt.param_groups[0]["lr"], "sec_per_iter": (time.time() - start) / len(window)}
            if info.is_main:
                with open(run_dir / LOG_FILE, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4g}", N=record["num_scales"])
            window, start = [], time.time()
        if k % save_every == 0 or k == settings.iters:
            if info.is_main:
                trainer.save_state(state_path)
                trainer.export(model_path)
            barrier()
    if bar is not None:
        bar.close()
    print0(f"{run_dir}: trained {settings.mode} for {trainer.iteration} iterations; model in {model_path}")
    return model_path
