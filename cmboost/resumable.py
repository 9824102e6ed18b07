"""Resumable, sharded batch jobs that turn indices into images and end in one sample file.

Each batch of global indices [b*B, (b+1)*B) is written atomically as its own part file in
`<out>.parts/`; a rerun skips the parts already there, so a job killed at any moment (kill -9
included) resumes to a bit-identical result. Under torchrun the batches are dealt round-robin to
the ranks; rank 0 merges the parts in index order, so the output does not depend on the number of
processes. The parts folder records the job's configuration and refuses to be mixed with another.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cmboost.atomic import atomic_open, atomic_write_text
from cmboost.samples import save_samples
from cmboost.atomic import refuse_existing
from cmboost.errors import UserInputError
from cmboost.runtime import barrier, dist_info, shard

BatchFn = Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray | None]]


def parts_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _write_part(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _prepare(parts: Path, config: dict) -> None:
    record = parts / "config.json"
    wanted = json.dumps(config, sort_keys=True, indent=1)
    if record.is_file():
        if record.read_text() != wanted:
            raise UserInputError(
                f"{parts}: holds a partial run with another configuration; rerun with the same flags "
                f"to resume, or delete that folder to start over")
        return
    atomic_write_text(record, wanted)  # creates the parts folder


def run_resumable(out: str | os.PathLike, num_items: int, batch_size: int, process: BatchFn, config: dict,
                  overwrite: bool = False, progress: bool = True, desc: str = "images") -> Path:
    """Runs `process(indices) -> (uint8 NCHW images, labels or None)` over all indices, resumably,
    and writes `out` (.npz or PNG folder). `config` must describe everything the result depends on;
    the batch size is recorded with it, since the parts' index ranges follow from it, so a resume
    must use the same batch size."""
    out = Path(out)
    info = dist_info()
    refuse_existing(out, overwrite)
    parts = parts_dir(out)
    starts = list(range(0, num_items, batch_size))
    if info.is_main:
        _prepare(parts, dict(config, num_items=num_items, batch_size=batch_size))
    barrier()
    todo = [s for s in shard(starts, info) if not (parts / f"part-{s:09d}.npz").is_file()]
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        done = sum(min(batch_size, num_items - s) for s in starts if (parts / f"part-{s:09d}.npz").is_file())
        bar = tqdm(total=num_items, initial=done, unit="img", desc=desc,
                   dynamic_ncols=True, mininterval=1.0)
    for start in todo:
        indices = list(range(start, min(start + batch_size, num_items)))
        images, labels = process(indices)
        _write_part(parts / f"part-{start:09d}.npz", images, labels)
        if bar is not None:
            bar.update(len(indices) * info.world_size)
    if bar is not None:
        bar.close()
    barrier()
    if info.is_main:
        _merge(parts, starts, out, overwrite)
    barrier()
    return out


def _merge(parts: Path, starts: list[int], out: Path, overwrite: bool) -> None:
    images, labels = [], []
    for start in starts:
        with np.load(parts / f"part-{start:09d}.npz", allow_pickle=False) as part:
            images.append(part["images"])
            labels.append(part["labels"] if "labels" in part.files else None)
    all_labels = None if any(lab is None for lab in labels) else np.concatenate(labels)
    save_samples(out, np.concatenate(images), all_labels, overwrite=overwrite)
    shutil.rmtree(parts, ignore_errors=True)
