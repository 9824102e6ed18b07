"""Drawing sample files from a consistency model (or an EDM teacher): seeded, sharded, resumable.

Sample i depends only on (seed, i): its generator first gives a uniform draw that picks its class
label (so the noise does not depend on --class-labels), then its initial noise, then the noise
between steps. Batches are written as part files in `<out>.parts/` (atomically); rerunning the
same command skips the parts already there, and the final .npz is assembled atomically at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmboost.atomic import atomic_open
from cmboost.cm.checkpoint import LoadedModel, load_model
from cmboost.cm.denoiser import Denoiser, check_ts, heun, multistep, onestep
from cmboost.samples import save_samples, to_uint8
from cmboost.atomic import refuse_existing
from cmboost.errors import UserInputError
from cmboost.runtime import DistInfo, barrier, dist_info, randn_per_sample, sample_generators

SETTINGS_NAME = "settings.json"
EDM_DEFAULT_STEPS = 18


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
    steps = 1 if steps is None else steps
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


def _parse_int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values:
        raise UserInputError(f"{flag}: empty list")
    return values


def _save_part(parts_dir: Path, indices: list[int], images: np.ndarray, labels: np.ndarray | None) -> None:
    name = f"part-{indices[0]:09d}-{len(indices):06d}.npz"
    arrays = {"indices": np.asarray(indices, dtype=np.int64), "images": images}
    if labels is not None:
        arrays["labels"] = labels
    with atomic_open(parts_dir / name, "wb") as fh:
        np.savez(fh, **arrays)


def _read_parts(parts_dir: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    parts = []
    for file in sorted(parts_dir.glob("part-*.npz")):
        try:
            with np.load(file, allow_pickle=False) as archive:
                parts.append((archive["indices"], archive["images"],
                              archive["labels"] if "labels" in archive.files else None))
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise UserInputError(f"{file}: damaged part file ({err}); delete it and rerun to redo that batch") from None
    return parts


def _check_settings(parts_dir: Path, settings: dict, info: DistInfo) -> None:
    path = parts_dir / SETTINGS_NAME
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != settings:
            diff = [k for k in settings if saved.get(k) != settings[k]]
            raise UserInputError(f"{parts_dir}: unfinished parts from a run with other settings ({', '.join(diff)}); "
                                 f"rerun that command to finish it, or delete the folder")
    elif info.is_main:
        path.write_text(json.dumps(settings, indent=2))


def generate_samples(model: str | os.PathLike, out: str | os.PathLike, num: int, steps: int | None = None,
                     seed: int = 0, ts: Sequence[int] | None = None, num_levels: int | None = None,
                     class_labels: Sequence[int] | None = None, kind: str | None = None, batch_size: int = 256,
                     device: torch.device | None = None, precision: str = "fp32", overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Writes `num` samples of `model` to `out` (OpenAI .npz, or a PNG folder). Resumable and sharded."""
    device = device or torch.device("cpu")
    out = Path(out)
    info = dist_info()
    if num < 1:
        raise UserInputError(f"--num {num}: must be at least 1")
    if batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: must be at least 1")
    refuse_existing(out, overwrite)
    loaded = load_model(model, kind)
    choice = choose_sampler(loaded, steps, ts, num_levels)
    if class_labels is not None:
        if loaded.num_classes is None:
            raise UserInputError("--class-labels: this model is unconditional")
        bad = [c for c in class_labels if not 0 <= c < loaded.num_classes]
        if bad:
            raise UserInputError(f"--class-labels: {bad[0]} is outside 0..{loaded.num_classes - 1}")
    loaded.net.to(device).eval()

    parts_dir = out.parent / (out.name + ".parts")
    settings = {"model": str(Path(model).resolve()), "model_bytes": Path(model).stat().st_size if Path(model).is_file() else None,
                "kind": loaded.kind, "sampler": dataclasses.asdict(choice), "seed": seed, "num": num,
                "class_labels": list(class_labels) if class_labels else None, "precision": precision}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they read back
    if info.is_main:
        parts_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    _check_settings(parts_dir, settings, info)
    done = {int(i) for part in _read_parts(parts_dir) for i in part[0]}
    barrier()  # every rank has listed the parts before any rank writes new ones
    remaining = [i for i in range(num) if i not in done]
    chunks = [remaining[s:s + batch_size] for s in range(0, len(remaining), batch_size)]
    mine = chunks[info.rank::info.world_size]

    bar = None
    if progress and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=num, initial=len(done), unit="img", desc=f"sample {loaded.kind} {choice.name}",
                   dynamic_ncols=True)
    for chunk in mine:
        images, labels = sample_batch(loaded, choice, chunk, seed, device, precision, class_labels)
        _save_part(parts_dir, chunk, to_uint8(images, "signed"), None if labels is None else labels.numpy())
        if bar is not None:
            bar.update(len(chunk) * info.world_size)
    if bar is not None:
        bar.close()
    barrier()
    if info.is_main:
        merge_parts(parts_dir, out, num, overwrite)
    barrier()
    return out


def merge_parts(parts_dir: Path, out: Path, num: int, overwrite: bool) -> Path:
    """Assembles the part files (each sample exactly once) into `out`, then removes the parts."""
    parts = _read_parts(parts_dir)
    if not parts:
        raise UserInputError(f"{parts_dir}: no part files")
    indices = np.concatenate([p[0] for p in parts])
    order = np.argsort(indices, kind="stable")
    if len(indices) != num or not np.array_equal(indices[order], np.arange(num)):
        raise UserInputError(f"{parts_dir}: parts hold {len(np.unique(indices))} distinct of {num} samples "
                             f"({len(indices)} in all); rerun the same command to finish")
    images = np.concatenate([p[1] for p in parts])[order]
    labels = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])[order]
    save_samples(out, images, labels, overwrite=overwrite)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out
