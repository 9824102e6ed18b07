"""Drawing sample files from a consistency model (or an EDM teacher): seeded, sharded, resumable.

Sample i depends only on (seed, i): its generator first gives a uniform draw that picks its class
label (so the noise does not depend on --class-labels), then its initial noise, then the noise
between steps; the network sees fixed blocks of samples (`block_size`), so the images
depend on neither the batch size nor the number of processes. The batches run as a resumable job
(jobs.run_parts): rerunning the same command finishes it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from cmboost.cm.checkpoint import LoadedModel, load_model
from cmboost.cm.denoiser import Denoiser, check_ts, heun, multistep, onestep
from cmboost.errors import UserInputError
from cmboost.files.samples import to_uint8
from cmboost.jobs.config import file_digest
from cmboost.jobs.parts import refuse_finished, run_parts
from cmboost.records import check_at_least, check_seed
from cmboost.runtime import (BLOCK_SIZE, check_allocatable, deterministic_kernels, init_distributed, randn_per_sample,
                             resolve_device, resolve_precision, sample_generators)

EDM_DEFAULT_STEPS = 18  # Heun steps of an EDM teacher
CM_DEFAULT_STEPS = 1    # network evaluations of a consistency model


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """The numbers of a sampling run (`cmboost sample` reads its flags' defaults here), checked when
    built, before the model is read."""

    num: int
    steps: int | None = None  # None: CM_DEFAULT_STEPS, or EDM_DEFAULT_STEPS for an EDM teacher
    seed: int = 0             # in [0, 2^63): sample i's stream is (seed, i)
    batch_size: int = 256     # images per part file; the images do not depend on it
    block_size: int = BLOCK_SIZE   # images the network sees together, sample i in block i // size

    def __post_init__(self):
        check_at_least(self, 1, ("num", "steps", "batch_size", "block_size"))
        check_seed(self)


@dataclasses.dataclass(frozen=True)
class SamplerChoice:
    """Which sampler and schedule: "onestep", "multistep" (ts of N levels) or "heun" (EDM teachers)."""

    name: str
    steps: int
    ts: tuple[int, ...] | None = None
    num_levels: int | None = None


def choose_sampler(loaded: LoadedModel, steps: int | None, ts: Sequence[int] | None = None,
                   num_levels: int | None = None) -> SamplerChoice:
    """Resolves --steps/--ts/--N against the model's kind and stored defaults."""
    if (ts is None) != (num_levels is None):
        raise UserInputError("--ts and --N go together")
    if loaded.kind == "edm":
        if ts is not None:
            raise UserInputError("--ts/--N are for consistency models; an EDM teacher samples with Heun (--steps)")
        steps = EDM_DEFAULT_STEPS if steps is None else steps
        if steps < 1:
            raise UserInputError(f"--steps {steps}: must be at least 1")
        return SamplerChoice("heun", steps)
    if ts is not None:
        try:
            check_ts(ts, num_levels)
        except ValueError as err:
            raise UserInputError(f"--ts/--N: {err}") from None
        if steps is not None and steps != len(ts) - 1:
            raise UserInputError(f"--steps {steps} but --ts {','.join(map(str, ts))} gives {len(ts) - 1} steps")
        return SamplerChoice("multistep", len(ts) - 1, tuple(ts), num_levels)
    steps = CM_DEFAULT_STEPS if steps is None else steps
    if steps == 1:
        return SamplerChoice("onestep", 1)
    if steps < 1:
        raise UserInputError(f"--steps {steps}: must be at least 1")
    if loaded.ts is None or len(loaded.ts) != steps + 1:
        have = f" (its default schedule has {len(loaded.ts) - 1} steps)" if loaded.ts else ""
        raise UserInputError(f"--steps {steps}: this {loaded.kind} model has no default {steps}-step schedule{have} (--kind cd|ct picks OpenAI's); "
                             f"pass --ts and --N (e.g. --ts 0,22,39 --N 40 for CD, 0,106,200 --N 201 for CT)")
    return SamplerChoice("multistep", steps, tuple(loaded.ts), loaded.num_levels)


def draw_labels(generators: Sequence[torch.Generator], num_classes: int | None,
                class_labels: Sequence[int] | None) -> torch.Tensor | None:
    """One uniform draw per sample picks its label from `class_labels` (default: all classes)."""
    if num_classes is None:
        return None
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    choices = torch.as_tensor(list(class_labels) if class_labels else range(num_classes), dtype=torch.int64)
    return choices[(u * len(choices)).long().clamp_max(len(choices) - 1)]


@torch.no_grad()
def sample_batch(loaded: LoadedModel, choice: SamplerChoice, indices: Sequence[int], seed: int,
                 device: torch.device, precision: str = "fp32",
                 class_labels: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float images in [-1, 1] (NCHW, on CPU) and labels for samples `indices` of run `seed`."""
    generators = sample_generators(seed, indices)
    labels = draw_labels(generators, loaded.num_classes, class_labels)
    shape = (loaded.in_channels, loaded.image_size, loaded.image_size)
    noise = randn_per_sample(generators, shape, device=device)
    y = None if labels is None else labels.to(device)
    denoiser = Denoiser(loaded.net, loaded.precond, device, precision, clip=True)
    p = loaded.precond
    if choice.name == "onestep":
        x = onestep(denoiser, noise, y, sigma_max=p.sigma_max)
    elif choice.name == "multistep":
        x = multistep(denoiser, noise, y, choice.ts, choice.num_levels, generators, p.sigma_min, p.sigma_max)
    else:
        x = heun(denoiser, noise, y, choice.steps, p.sigma_min, p.sigma_max).clamp(-1, 1)
    return x.float().cpu(), labels


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleRun(SampleSettings):
    """One `cmboost sample`: the model, the output and how to draw, with SampleSettings' numbers."""

    model: str                              # cmboost .safetensors, OpenAI .pt or a diffusers folder
    out: str                                # .npz or a PNG folder
    ts: tuple[int, ...] | None = None       # multistep indices into the num_levels-level Karras grid
    num_levels: int | None = None
    class_labels: tuple[int, ...] | None = None  # the classes labels are drawn from (default: all)
    kind: str | None = None                 # the model's kind when the file name does not tell
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    progress: bool = True


def sample(run: SampleRun) -> Path:
    """Writes `run.num` samples of `run.model` to `run.out` (OpenAI .npz, or a PNG folder). Resumable and
    sharded (under torchrun, each rank draws its share). The network sees `block_size` images at a time
    (the images depend on it, not on `batch_size`). Device and precision: runtime.resolve_device and
    resolve_precision ("auto": CUDA with bf16 when present, else CPU in fp32)."""
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    init_distributed(device)
    out, num, model, class_labels = Path(run.out), run.num, run.model, run.class_labels
    refuse_finished(out, run.overwrite)
    loaded = load_model(model, run.kind)
    # The finished job's images are merged in memory (the parts, then in index order): refused now,
    # before any list or array of `num` entries exists, if they could never fit.
    image_bytes = loaded.in_channels * loaded.image_size ** 2
    check_allocatable(num * (2 * image_bytes + 64),
                      f"--num {num}: {num} samples of {loaded.in_channels}x{loaded.image_size}x{loaded.image_size}")
    choice = choose_sampler(loaded, run.steps, run.ts, run.num_levels)
    if class_labels is not None:
        if loaded.num_classes is None:
            raise UserInputError("--class-labels: this model is unconditional")
        bad = [c for c in class_labels if not 0 <= c < loaded.num_classes]
        if bad:
            raise UserInputError(f"--class-labels: {bad[0]} is outside 0..{loaded.num_classes - 1}")
    loaded.net.to(device).eval()

    # One RNG stream per sample and fixed compute blocks: a resume may change the batch size.
    config = {"model": str(Path(model).resolve()), "model_digest": file_digest(model), "kind": loaded.kind,
              "sampler": dataclasses.asdict(choice), "seed": run.seed,
              "class_labels": list(class_labels) if class_labels else None, "precision": precision}

    def process(chunk):
        images, labels = sample_batch(loaded, choice, chunk, run.seed, device, precision, class_labels)
        return to_uint8(images, "signed"), None if labels is None else labels.numpy()

    with deterministic_kernels(device):
        run_parts(out, num, run.batch_size, process, config, may_change=("batch_size",),
                  overwrite=run.overwrite, progress=run.progress, desc=f"sample {loaded.kind} {choice.name}",
                  block_size=run.block_size)
    return out
