"""Adversarial training of the joint classifier-discriminator (METHOD.md §3).

Per iteration: a real batch (x, y) and a generated batch (xh, yh) with the labels they were
generated for. PGD pushes the real images towards "fake" (L2, eps 1, 2 steps of 0.5, random
start) and the generated ones towards "real" (L2, eps 100, 5 steps of 0.1, one more step every
1000 iterations); then one forward on cat(x_adv, xh_adv) gives the objective's loss, and Adam
(lr 1e-5, MultiStepLR x0.1 at 4000, gradient-norm clip 1.0) takes a step. The values an
attack maximises come from the objective (see cmboost.losses).

Everything random is a function of (seed, step, sample position), so a run resumes exactly and
DDP under torchrun gives the same updates as one process with the same global batch: the global
batch is split into contiguous, equal shares, the loss is a mean over each share, and DDP averages
gradients. The run directory holds config.json, state.pt (the latest checkpoint), log.jsonl and,
at the end, model.safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cmboost.atomic import atomic_path, atomic_write_text
from cmboost.attacks import NORMS, PGD
from cmboost.checkpoints import torch_load
from cmboost.data import load_dataset, load_samples, to_float
from cmboost.errors import UserInputError
from cmboost.jcd import (ARCHS, build_joint_model, load_joint_model, log_realness_from_logits,
                         save_joint_model)
from cmboost.losses import OBJECTIVES, get_objective
from cmboost.runtime import (autocast, barrier, init_distributed, print0, resolve_device, resolve_precision,
                             sample_generators)

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"
# Fields that may change between the first command and a resuming one.
RESUMABLE_CHANGES = ("iters", "log_every", "ckpt_every", "device", "precision", "channels_last")


@dataclasses.dataclass
class TrainConfig:
    """Defaults are the released hyperparameters (METHOD.md §3)."""

    data: str                              # "fmnist", "imagenet64:PATH" or "folder:PATH"
    run_dir: str
    iters: int
    generated: list[str] = dataclasses.field(default_factory=list)  # .npz files with labels
    arch: str | None = None                # None: from --init
    width: int | None = None               # resnet_small only: first-stage width (None: 16)
    objective: str = "joint"
    init: str | None = None                # any checkpoint load_joint_model reads
    data_dir: str | None = None
    image_size: int | None = None          # None: the generated images' size
    real_limit: int | None = None          # use only the first N real images
    batch_size: int = 128                  # global real batch
    gen_batch_size: int | None = None      # global generated batch; None: batch_size
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (4000,)
    gamma: float = 0.1
    grad_clip: float = 1.0                 # 0 disables
    attack_norm: str = "l2"
    real_eps: float = 1.0
    real_steps: int = 2
    real_step_size: float = 0.5
    real_random_start: bool = True
    gen_eps: float = 100.0
    gen_steps: int = 5
    gen_step_size: float = 0.1
    gen_random_start: bool = False
    gen_steps_every: int = 1000            # one more generated-attack step every N iterations; 0: never
    gen_max_steps: int | None = None
    attack_mode: str = "eval"              # model mode during attacks: "eval" or "train"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None      # None: on for CUDA
    log_every: int = 10
    ckpt_every: int = 500

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["milestones"] = list(self.milestones)
        out["generated"] = [str(g) for g in self.generated]
        return out


# ----------------------------------------------------------------------------- checks

def _check_config(c: TrainConfig) -> None:
    def positive(name: str, value, allow_zero: bool = False) -> None:
        if value is None or value < 0 or (value == 0 and not allow_zero):
            raise UserInputError(f"--{name.replace('_', '-')} {value}: must be {'>= 0' if allow_zero else '> 0'}")

    if c.objective not in OBJECTIVES:
        raise UserInputError(f"--objective {c.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if c.arch is not None and c.arch not in ARCHS:
        raise UserInputError(f"--arch {c.arch!r}: choose one of {', '.join(ARCHS)}")
    if c.arch is None and c.init is None:
        raise UserInputError("--arch: required when training from scratch (no --init)")
    if c.width is not None and (c.init is not None or c.arch != "resnet_small" or c.width < 1):
        raise UserInputError(f"--width {c.width}: only for resnet_small trained from scratch, and at least 1")
    if c.attack_norm not in NORMS:
        raise UserInputError(f"--attack-norm {c.attack_norm!r}: choose one of {', '.join(NORMS)}")
    if c.attack_mode not in ("eval", "train"):
        raise UserInputError(f"--attack-mode {c.attack_mode!r}: choose eval or train")
    positive("iters", c.iters, allow_zero=True)
    positive("batch_size", c.batch_size)
    if c.gen_batch_size is not None:
        positive("gen_batch_size", c.gen_batch_size)
    positive("lr", c.lr)
    for name in ("real_eps", "real_step_size", "gen_eps", "gen_step_size", "weight_decay", "grad_clip"):
        positive(name, getattr(c, name), allow_zero=True)
    for name in ("real_steps", "gen_steps", "gen_steps_every"):
        positive(name, getattr(c, name), allow_zero=True)
    positive("log_every", c.log_every)
    positive("ckpt_every", c.ckpt_every)
    if c.real_limit is not None:
        positive("real_limit", c.real_limit)
    if not (0 <= c.betas[0] < 1 and 0 <= c.betas[1] < 1):
        raise UserInputError(f"--betas {c.betas}: each must be in [0, 1)")
    if c.objective != "ce" and not c.generated:
        raise UserInputError(f"--generated: objective {c.objective} needs generated samples (.npz with labels)")


def load_training_data(c: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                 torch.Tensor | None, int]:
    """Real (uint8 NCHW, labels), generated (uint8 NCHW, labels) and the number of classes,
    after checking that sizes, channels and labels agree."""
    gen_images, gen_labels = [], []
    for file in c.generated:
        images, labels = load_samples(file)
        if labels is None:
            raise UserInputError(f"--generated {file}: no labels (arr_1); training needs the labels "
                                 f"the images were generated for")
        if gen_images and images.shape[1:] != gen_images[0].shape[1:]:
            raise UserInputError(f"--generated {file}: images are {_chw(images.shape)}, "
                                 f"but {c.generated[0]} holds {_chw(gen_images[0].shape)}")
        if len(images) == 0:
            raise UserInputError(f"--generated {file}: holds no images")
        gen_images.append(images)
        gen_labels.append(labels)
    gen_size = gen_images[0].shape[-1] if gen_images else None
    kind = c.data.partition(":")[0]
    size = c.image_size
    if size is None and gen_size is not None and (kind == "folder" or (kind in ("fmnist", "fashion-mnist")
                                                                       and gen_size in (28, 32))):
        size = gen_size
    real, real_labels, num_classes = load_dataset(c.data, "train", data_dir=c.data_dir, image_size=size)
    if c.real_limit is not None:
        real, real_labels = real[: c.real_limit], real_labels[: c.real_limit]
    if len(real) == 0:
        raise UserInputError(f"--data {c.data}: no images")
    if gen_images:
        first = gen_images[0]
        if first.shape[1:] != real.shape[1:]:
            raise UserInputError(f"--generated {c.generated[0]}: images are {_chw(first.shape)} but --data "
                                 f"{c.data} gives {_chw(real.shape)}")
        for file, labels in zip(c.generated, gen_labels):
            if labels.max() >= num_classes:
                raise UserInputError(f"--generated {file}: label {labels.max()} out of range for the "
                                     f"{num_classes} classes of --data {c.data}")
        gen = torch.from_numpy(np.concatenate(gen_images))
        gen_y = torch.from_numpy(np.concatenate(gen_labels))
    else:
        gen = gen_y = None
    return torch.from_numpy(real), torch.from_numpy(real_labels), gen, gen_y, num_classes


def _chw(shape) -> str:
    return "x".join(str(v) for v in shape[1:])


# ----------------------------------------------------------------------------- batching

class IndexStream:
    """An endless stream of indices into n items: epoch e is permutation (seed, tag, e).
    Position p of the stream is a pure function, so any step of any rank can be rebuilt."""

    def __init__(self, n: int, seed: int, tag: int):
        self.n, self.seed, self.tag = n, seed, tag
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed & 0xFFFFFFFF, self.tag, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i, p in enumerate(range(start, start + count)):
            epoch, offset = divmod(p, self.n)
            out[i] = self._permutation(epoch)[offset]
        return out


def rank_share(global_batch: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of a global batch (equal shares, so mean-of-means == mean)."""
    if global_batch % world:
        raise UserInputError(f"--batch-size {global_batch}: must be divisible by the {world} processes")
    share = global_batch // world
    return slice(rank * share, (rank + 1) * share)


def gen_steps_at(c: TrainConfig, step: int) -> int:
    """The generated-attack step curriculum: gen_steps + step // gen_steps_every, capped."""
    steps = c.gen_steps + (step // c.gen_steps_every if c.gen_steps_every else 0)
    return min(steps, c.gen_max_steps) if c.gen_max_steps is not None else steps


# ----------------------------------------------------------------------------- files

def _atomic_torch_save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_same_run(run_dir: Path, c: TrainConfig) -> None:
    """A run directory belongs to one configuration; only RESUMABLE_CHANGES may differ."""
    path = run_dir / CONFIG_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: unreadable run config ({err}); use a new --run-dir") from None
    new = c.to_json()
    for key in new:
        if key in RESUMABLE_CHANGES:
            continue
        if old.get(key) != new[key]:
            flag = "--" + key.replace("_", "-")
            raise UserInputError(f"--run-dir {run_dir}: was started with {flag} {old.get(key)!r}, now "
                                 f"{new[key]!r}; rerun the same command to resume, or use a new --run-dir")


def _log_step(line: str) -> float:
    """The step of one log line; a torn or foreign line counts as 'after everything'."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return float("inf")


def _load_state(path: Path) -> dict:
    return torch_load(path, fix="it is this run's training checkpoint: delete it to restart the run")


# ----------------------------------------------------------------------------- metrics

def _batch_metrics(prefix: str, logits: torch.Tensor, y: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    logits = logits.detach().float()
    return {f"acc_{prefix}": (logits.argmax(1) == y).float().mean(),
            f"realness_{prefix}": log_realness_from_logits(logits, y, kind).exp().mean()}


def _reduce_mean(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Mean over ranks (equal shares), as Python floats."""
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if world > 1:
        torch.distributed.all_reduce(stacked)
        stacked /= world
    return {k: float(v) for k, v in zip(keys, stacked.cpu())}


# ----------------------------------------------------------------------------- one iteration

@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits_real: torch.Tensor
    logits_gen: torch.Tensor | None
    x_real_adv: torch.Tensor
    x_gen_adv: torch.Tensor | None


def training_step(model: torch.nn.Module, objective, optimizer: torch.optim.Optimizer, real_attack: PGD,
                  gen_attack: PGD | None, x_real: torch.Tensor, y_real: torch.Tensor, x_gen: torch.Tensor | None,
                  y_gen: torch.Tensor | None, precision: str = "fp32", grad_clip: float = 1.0,
                  attack_mode: str = "eval", train_model: torch.nn.Module | None = None,
                  scaler: torch.amp.GradScaler | None = None, real_generators=None,
                  gen_generators=None) -> StepResult:
    """One iteration (METHOD.md §3): attack the real batch towards "fake" and the generated batch
    towards "real" (input gradients only), then one forward on cat(x_adv, xh_adv), backward,
    gradient-norm clip and optimizer step. `train_model` is the DDP wrapper when there is one;
    the attacks always use the bare `model` so no gradient hooks fire. No scheduler step here."""
    train_model = train_model if train_model is not None else model
    device = x_real.device
    model.train(attack_mode == "train")  # the attacks' mode; PGD itself never changes it
    x_real_adv = real_attack(model, lambda x: objective.real_attack(model(x), y_real), x_real,
                             generators=real_generators)
    x_gen_adv = None
    if gen_attack is not None and objective.uses_generated and x_gen is not None:
        x_gen_adv = gen_attack(model, lambda x: objective.gen_attack(model(x), y_gen), x_gen,
                               generators=gen_generators)
    train_model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss, terms, logits_real, logits_gen = objective.forward(train_model, x_real_adv, y_real, x_gen_adv, y_gen)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return StepResult(loss.detach(), terms, logits_real.detach(),
                      None if logits_gen is None else logits_gen.detach(), x_real_adv, x_gen_adv)


# ----------------------------------------------------------------------------- the loop

def train_jcd(config: TrainConfig) -> Path:
    """Trains (or resumes) the run in config.run_dir; returns the final model's path."""
    c = config
    _check_config(c)
    device = resolve_device(c.device)
    precision = resolve_precision(c.precision, device)
    channels_last = device.type == "cuda" if c.channels_last is None else bool(c.channels_last)
    info = init_distributed(device)
    objective = get_objective(c.objective)
    kind = objective.realness_kind

    # Inputs first: every mismatch is reported before any work.
    real, real_y, gen, gen_y, num_classes = load_training_data(c)
    gen_batch = c.gen_batch_size or c.batch_size
    real_share = rank_share(c.batch_size, info.rank, info.world_size)
    gen_share = rank_share(gen_batch, info.rank, info.world_size)
    if c.init is not None:
        model = load_joint_model(c.init, arch=c.arch)
        if model.num_classes != num_classes:
            raise UserInputError(f"--init {c.init}: the model has {model.num_classes} classes, "
                                 f"--data {c.data} has {num_classes}")
        if model.in_channels != real.shape[1]:
            raise UserInputError(f"--init {c.init}: the model takes {model.in_channels} channels, "
                                 f"--data {c.data} has {real.shape[1]}")
    else:
        torch.manual_seed(c.seed)
        model = build_joint_model(c.arch, num_classes, real.shape[1], real.shape[-1], width=c.width)
    model.image_size = int(real.shape[-1])

    run_dir = Path(c.run_dir)
    state_path, final_path, log_path = run_dir / STATE_FILE, run_dir / MODEL_FILE, run_dir / LOG_FILE
    if (run_dir / CONFIG_FILE).exists():
        _check_same_run(run_dir, c)
    state = _load_state(state_path) if state_path.exists() else None
    start = int(state["step"]) if state is not None else 0
    if state is not None and start >= c.iters and final_path.exists():
        print0(f"train-jcd: {run_dir} already finished ({start} iterations); model at {final_path}")
        return final_path
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / CONFIG_FILE).exists():
            atomic_write_text(run_dir / CONFIG_FILE, json.dumps(c.to_json(), indent=2) + "\n")
        if log_path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [line for line in log_path.read_text().splitlines() if _log_step(line) <= start]
            atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    barrier()

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(c.milestones), gamma=c.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched = dict(state["scheduler"])
        sched["milestones"] = Counter({int(k): int(v) for k, v in sched["milestones"].items()})
        scheduler.load_state_dict(sched)
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        print0(f"train-jcd: resuming {run_dir} at iteration {start}/{c.iters}")
    else:
        print0(f"train-jcd: {c.arch or model.arch} on {c.data} ({len(real)} real, "
               f"{0 if gen is None else len(gen)} generated), objective {c.objective}, {c.iters} iterations, "
               f"{device} {precision}, {info.world_size} process(es)")

    train_model = model
    if info.enabled and device.type == "cuda":
        # Each rank sees 1/world of the batch: synchronised BatchNorm keeps the statistics those of the
        # global batch, as with one process (parameters are shared, so the optimizer is unaffected).
        # SyncBatchNorm needs CUDA; resnet_small uses GroupNorm and needs none.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    real_stream = IndexStream(len(real), c.seed, 1)
    gen_stream = IndexStream(len(gen), c.seed, 2) if gen is not None else None
    real_attack = PGD(c.attack_norm, c.real_eps, c.real_step_size, c.real_steps, c.real_random_start,
                      precision=precision, channels_last=channels_last)
    uses_gen = objective.uses_generated and gen is not None

    def save_state(step: int) -> None:
        if info.is_main:
            sched = scheduler.state_dict()
            sched["milestones"] = {int(k): int(v) for k, v in sched["milestones"].items()}
            payload = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": sched, "rng_cpu": torch.get_rng_state()}
            if scaler.is_enabled():
                payload["scaler"] = scaler.state_dict()
            _atomic_torch_save(payload, state_path)
        barrier()

    def to_device(u8: torch.Tensor) -> torch.Tensor:
        x = to_float(u8).to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    window_start, window_images = time.perf_counter(), 0
    for step in range(start, c.iters):
        idx = real_stream.take(step * c.batch_size, c.batch_size)[real_share]
        x_real, y_real = to_device(real[idx]), real_y[idx].to(device)
        positions = np.arange(step * c.batch_size, (step + 1) * c.batch_size)[real_share]
        x_gen = y_gen = None
        if gen_stream is not None:
            gidx = gen_stream.take(step * gen_batch, gen_batch)[gen_share]
            x_gen, y_gen = to_device(gen[gidx]), gen_y[gidx].to(device)
            gen_positions = np.arange(step * gen_batch, (step + 1) * gen_batch)[gen_share]

        n_gen_steps = gen_steps_at(c, step)
        gen_attack = None
        if uses_gen:
            gen_attack = PGD(c.attack_norm, c.gen_eps, c.gen_step_size, n_gen_steps, c.gen_random_start,
                             precision=precision, channels_last=channels_last)
        result = training_step(
            model, objective, optimizer, real_attack, gen_attack, x_real, y_real, x_gen, y_gen,
            precision=precision, grad_clip=c.grad_clip, attack_mode=c.attack_mode, train_model=train_model,
            scaler=scaler, real_generators=sample_generators(c.seed, 2 * positions) if c.real_random_start else None,
            gen_generators=sample_generators(c.seed, 2 * gen_positions + 1) if uses_gen and c.gen_random_start
            else None)
        loss, terms, logits_real, logits_gen = result.loss, result.terms, result.logits_real, result.logits_gen
        scheduler.step()
        done = step + 1
        window_images += c.batch_size + (gen_batch if uses_gen else 0)

        if done % c.log_every == 0 or done == c.iters:
            values = {"loss": loss.detach(), **terms, **_batch_metrics("real_adv", logits_real, y_real, kind)}
            if logits_gen is not None:
                values.update(_batch_metrics("gen_adv", logits_gen, y_gen, kind))
            model.eval()  # clean scores; eval so that no BatchNorm statistics move
            with torch.no_grad(), autocast(device, precision):
                values.update(_batch_metrics("real", model(x_real), y_real, kind))
                if x_gen is not None:
                    values.update(_batch_metrics("gen", model(x_gen), y_gen, kind))
            record = {"step": done, **_reduce_mean(values, info.world_size),
                      "lr": optimizer.param_groups[0]["lr"], "gen_steps": n_gen_steps if uses_gen else 0}
            elapsed = time.perf_counter() - window_start
            record["images_per_s"] = window_images / max(elapsed, 1e-9)
            window_start, window_images = time.perf_counter(), 0
            if info.is_main:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                print0(_format_record(record, c.iters), flush=True)
        if done % c.ckpt_every == 0 or done == c.iters:
            save_state(done)

    if start >= c.iters and state is None:
        save_state(c.iters)  # zero iterations: still a resumable, finished run
    if info.is_main:
        save_joint_model(model, final_path, overwrite=True,
                         extra={"train_jcd": c.to_json(), "iterations": c.iters, "realness_kind": kind})
        print0(f"train-jcd: wrote {final_path} (realness kind: {kind})")
    barrier()
    return final_path


def _format_record(r: dict, iters: int) -> str:
    parts = [f"it {r['step']}/{iters}", f"loss {r['loss']:.4f}"]
    for group in ("real", "real_adv", "gen", "gen_adv"):
        if f"acc_{group}" in r:
            parts.append(f"{group} acc {r[f'acc_{group}']:.3f} D {r[f'realness_{group}']:.3f}")
    terms = [k for k in r if k.startswith(("ce_", "bce_", "joint_"))]
    parts += [f"{k} {r[k]:.4f}" for k in terms]
    parts.append(f"lr {r['lr']:.2e}")
    parts.append(f"{r['images_per_s']:.1f} img/s")
    return " | ".join(parts)
