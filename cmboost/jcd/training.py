"""Adversarial training of the joint classifier-discriminator (docs/method.md §3).

Per iteration: a real batch (x, y) and a generated batch (xh, yh) with the labels they were
generated for. PGD pushes the real images towards "fake" (L2, eps 1, 2 steps of 0.5, random
start) and the generated ones towards "real" (L2, eps 100, 5 steps of 0.1, one more step every
1000 iterations); then one forward on cat(x_adv, xh_adv) gives the objective's loss, and Adam
(lr 1e-5, MultiStepLR x0.1 at 4000, gradient-norm clip 1.0) takes a step. The values an
attack maximises come from the objective (see cmboost.jcd.losses).

Everything random is a function of (seed, step, sample position), so a run resumes exactly and
DDP under torchrun gives the same updates as one process with the same global batch: the global
batch is split into contiguous, equal shares, the loss is a mean over each share, and DDP averages
gradients. The run directory is a `jobs.Job`: config.json, state.safetensors (the latest
checkpoint), log.jsonl and, at the end, model.safetensors.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from cmboost.diagnostic.measures import load_teacher_score
from cmboost.errors import UserInputError
from cmboost.files.samples import to_float
from cmboost.jcd.attacks import PGD
from cmboost.jcd.config import TrainConfig, load_training_data
from cmboost.jcd.losses import GradientAlignment, get_objective
from cmboost.jcd.model import build_joint_model, load_joint_model, log_realness_from_logits, save_joint_model
from cmboost.jobs.job import MODEL_FILE, Job
from cmboost.jobs.training_state import TrainingState
from cmboost.runtime import (all_finite, autocast, barrier, init_distributed, on_every_rank, print0, resolve_device,
                             resolve_precision, sample_generators, seed_sequence)

# Fields that may change between the first command and a resuming one.
RESUMABLE_CHANGES = ("iters", "log_every", "ckpt_every", "device", "precision", "channels_last")


# ----------------------------------------------------------------------------- batching

class IndexStream:
    """An endless stream of indices into n items: epoch e is permutation (seed, tag, e).
    Position p of the stream is a pure function, so any step of any rank can be rebuilt."""

    def __init__(self, n: int, seed: int, tag: int):
        self.n, self.seed, self.tag = n, seed, tag
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng(seed_sequence(self.seed, self.tag, epoch)).permutation(self.n)
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
                  gen_generators=None, alignment: GradientAlignment | None = None) -> StepResult:
    """One iteration (docs/method.md §3): attack the real batch towards "fake" and the generated batch
    towards "real" (input gradients only), then one forward on cat(x_adv, xh_adv), backward,
    gradient-norm clip and optimizer step. `train_model` is the DDP wrapper when there is one;
    the attacks always use the bare `model` so no gradient hooks fire. With `alignment`, the clean real
    batch joins the same forward for the gradient-alignment term. No scheduler step here."""
    train_model = train_model if train_model is not None else model
    device = x_real.device
    model.train(attack_mode == "train")  # the attacks' mode; PGD itself never changes it
    x_real_adv = real_attack(model, lambda x: objective.real_attack(model(x), y_real), x_real,
                             generators=real_generators)
    x_gen_adv = None
    if gen_attack is not None and objective.uses_generated and x_gen is not None:
        x_gen_adv = gen_attack(model, lambda x: objective.gen_attack(model(x), y_gen), x_gen,
                               generators=gen_generators)
    aligned = alignment.batch(x_real, y_real) if alignment is not None else None
    train_model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        loss, terms, logits_real, logits_gen = objective.forward(train_model, x_real_adv, y_real, x_gen_adv, y_gen,
                                                                 aligned)
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
    c = config  # checked when it was built
    device = resolve_device(c.device)
    precision = resolve_precision(c.precision, device)
    channels_last = device.type == "cuda" if c.channels_last is None else bool(c.channels_last)
    info = init_distributed(device)
    objective = get_objective(c.objective)
    kind = objective.realness_kind

    # Inputs first: every mismatch is reported before any work.
    real, real_y, gen, gen_y, num_classes = load_training_data(c)
    alignment = None
    if c.align_teacher is not None:
        score = load_teacher_score(c.align_teacher, device, precision, image_shape=tuple(real.shape[1:]),
                                   num_classes=num_classes, flag="--align-teacher")
        alignment = GradientAlignment(score, c.align_sigma, c.align_weight)
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

    with Job(c.run_dir, c.to_json(), may_change=RESUMABLE_CHANGES, name=f"--run-dir {c.run_dir}",
             fresh="use a new --run-dir", as_flags=True) as job:
        run_dir = job.folder
        state_path, final_path = job.state_path, run_dir / MODEL_FILE
        state = job.load_state(meta_keys=("optimizer_groups", "scheduler"))  # TrainingState.meta_keys, read early
        start = state[0] if state is not None else 0
        if state is not None and start >= c.iters and final_path.exists():
            print0(f"train-jcd: {run_dir} already finished ({start} iterations); model at {final_path}")
            return final_path
        if info.is_main:
            job.trim_log(start, "step")
        barrier()

        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(c.milestones), gamma=c.gamma)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        training_state = TrainingState({"model": model}, optimizer, scheduler, scaler, rng=True)
        if state is not None:
            training_state.restore(job, state)
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
                training_state.save(job, step)
            barrier()

        last_saved = start if state is not None else None

        def stopped(what: str) -> None:
            """A non-finite loss or weight: nothing more is written (no checkpoint, log line or model), so
            state.safetensors keeps the last good checkpoint, and the run stops with one line."""
            kept = (f"{state_path} keeps the last good checkpoint (iteration {last_saved})" if last_saved is not None
                    else "no checkpoint had been written yet")
            raise UserInputError(f"--run-dir {run_dir}: {what}; training stopped and {kept}. Lower --lr (now "
                                 f"{c.lr:g}) or --grad-clip and start again in a new --run-dir")

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
                else None, alignment=alignment)
            loss, terms, logits_real, logits_gen = result.loss, result.terms, result.logits_real, result.logits_gen
            scheduler.step()
            done = step + 1
            if not on_every_rank(all_finite([loss, *model.parameters()]), device):
                stopped(f"the loss is {float(loss)} at iteration {done}" if not all_finite([loss]) else
                        f"the weights hold NaN or inf after iteration {done}")
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
                bad = [k for k, v in record.items() if isinstance(v, float) and not np.isfinite(v)]
                if bad:  # the same on every rank: the values were averaged over them
                    stopped(f"{bad[0]} is {record[bad[0]]} at iteration {done}")
                elapsed = time.perf_counter() - window_start
                record["images_per_s"] = window_images / max(elapsed, 1e-9)
                window_start, window_images = time.perf_counter(), 0
                if info.is_main:
                    job.append_log(record)
                    print0(_format_record(record, c.iters), flush=True)
            if done % c.ckpt_every == 0 or done == c.iters:
                save_state(done)
                last_saved = done

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
    terms = [k for k in r if k.startswith(("ce_", "bce_", "joint_", "align"))]
    parts += [f"{k} {r[k]:.4f}" for k in terms]
    parts.append(f"lr {r['lr']:.2e}")
    parts.append(f"{r['images_per_s']:.1f} img/s")
    return " | ".join(parts)
