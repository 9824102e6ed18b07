"""Index-to-image jobs (sample, boost): items processed in fixed blocks, written as part files in the job
folder, resumed from the parts already written, and merged into one sample file."""

from __future__ import annotations

import os
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_open, refuse_unsafe_output
from cmboost.files.samples import check_sample_output, save_samples, write_npz
from cmboost.runtime import barrier, dist_info

BatchFn = Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray | None]]
from cmboost.jobs.job import CONFIG_FILE, Job, check_job_folder, job_dir


def refuse_finished(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuses an existing output unless asked to overwrite it, or unless its job folder is still
    there (a job killed between writing the output and cleaning up: rerunning finishes it); and
    whatever `check_sample_output` refuses (a bad path or suffix, an output of another kind or a
    folder cmboost did not write), with or without --overwrite."""
    refuse_unsafe_output(out)  # before job_dir, which cannot name the job of "" or "."
    folder = job_dir(out)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder}: is a file, where this job keeps its folder; move it away, or choose "
                             f"another --out")
    check_job_folder(folder)  # a folder cmboost did not make is refused before the output is looked at
    check_sample_output(out, overwrite, resuming=(folder / CONFIG_FILE).is_file())


def _part_name(indices: Sequence[int]) -> str:
    return f"part-{int(indices[0]):09d}-{len(indices):06d}.npz"


def _write_part(folder: Path, indices: Sequence[int], images: np.ndarray, labels: np.ndarray | None) -> None:
    arrays = {"indices": np.asarray(indices, dtype=np.int64), "images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    with atomic_open(folder / _part_name(indices), "wb") as fh:
        write_npz(fh, arrays)


class _DamagedPart(Exception):
    """A part file that cannot be read whole (truncated, bad CRC, wrong contents)."""


def _load_part(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(indices, images, labels or None) of one part file, every member read whole (which checks
    its CRC) and checked against the part's name; _DamagedPart when that fails."""
    try:
        with np.load(file, allow_pickle=False) as archive:
            indices = archive["indices"]
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise _DamagedPart(str(err) or type(err).__name__) from None
    n = len(indices) if indices.ndim == 1 else -1
    if n < 1 or not np.issubdtype(indices.dtype, np.integer):
        raise _DamagedPart(f"indices are {indices.dtype} {indices.shape}")
    if file.name != _part_name(indices):
        raise _DamagedPart(f"holds {n} images from index {int(indices[0])}, its name says otherwise")
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n:
        raise _DamagedPart(f"images are {images.dtype} {images.shape} for {n} indices")
    if labels is not None and labels.shape != (n,):
        raise _DamagedPart(f"labels have shape {labels.shape} for {n} indices")
    return indices, images, labels


def _drop_damaged_parts(folder: Path) -> None:
    """Removes every part file that cannot be read whole, naming it: its blocks count as not done,
    so this run recomputes them (atomic writes mean only an outside hand can damage a part)."""
    for file in sorted(folder.glob("part-*.npz")):
        try:
            _load_part(file)
        except _DamagedPart as err:
            print(f"cmboost: {file}: damaged part file ({err}); removed, its images are computed again",
                  file=sys.stderr, flush=True)
            file.unlink(missing_ok=True)


def _read_parts(folder: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    found = []
    for file in sorted(folder.glob("part-*.npz")):
        try:
            found.append(_load_part(file))
        except _DamagedPart as err:
            # damaged after this run checked it: it is removed, and the next run recomputes it
            file.unlink(missing_ok=True)
            raise UserInputError(f"{file}: damaged part file ({err}); removed it: rerun the same command to "
                                 f"compute that batch again") from None
    return found


def _done_indices(folder: Path) -> set[int]:
    """The indices the part files hold (their `indices` members only: `_drop_damaged_parts` has
    already read each part whole)."""
    done: set[int] = set()
    for file in sorted(folder.glob("part-*.npz")):
        try:
            with np.load(file, allow_pickle=False) as archive:
                done.update(int(i) for i in archive["indices"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise UserInputError(f"{file}: damaged part file ({err}); delete it and rerun the same command "
                                 f"to compute that batch again") from None
    return done


def run_parts(out: str | os.PathLike, num_items: int, batch_size: int, process: BatchFn, config: dict,
              may_change: Sequence[str] = (), overwrite: bool = False, progress: bool = True,
              desc: str = "images", block_size: int = 1) -> Path:
    """Runs `process(indices) -> (uint8 NCHW images, labels or None)` over indices 0..num_items-1 as
    a `Job` in `job_dir(out)`, and writes `out` (.npz or PNG folder).

    The indices fall into fixed compute blocks (block b holds b*block_size .. (b+1)*block_size-1,
    the last one may be shorter), and `process` always sees exactly one block, so an image never
    depends on the batch size or the number of processes. `batch_size` only sets how many images a
    part file holds, rounded up to whole blocks; a rerun skips the blocks already done. Under
    torchrun the parts are dealt round-robin to the ranks and rank 0 merges them in index order.
    `config` must name everything the result depends on; only the fields in `may_change` may
    differ when a rerun resumes."""
    out = Path(out)
    info = dist_info()
    if num_items < 1:
        raise UserInputError(f"{out}: nothing to do (0 images)")
    if batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: must be at least 1")
    if block_size < 1:
        raise UserInputError(f"--block-size {block_size}: must be at least 1")
    refuse_finished(out, overwrite)
    folder = job_dir(out)
    config = dict(config, num_items=num_items, batch_size=batch_size, block_size=block_size)
    with Job(folder, config, may_change=may_change) as job:
        if info.is_main:
            _drop_damaged_parts(folder)
        barrier()
        done = _done_indices(folder)
        barrier()  # every rank has listed the parts before any rank writes new ones
        # The block size is recorded, so a block is either wholly in the parts or not at all.
        blocks = [list(range(s, min(s + block_size, num_items))) for s in range(0, num_items, block_size)]
        remaining = [block for block in blocks if block[0] not in done]
        per_part = max(1, batch_size // block_size)
        chunks = [remaining[s:s + per_part] for s in range(0, len(remaining), per_part)]
        bar = None
        if progress and info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=num_items, initial=len(done), unit="img", desc=desc, dynamic_ncols=True, mininterval=1.0)
        for chunk in chunks[info.rank::info.world_size]:
            indices, images, labels = _run_blocks(process, chunk)
            _write_part(folder, indices, images, labels)
            if bar is not None:
                bar.update(len(indices) * info.world_size)
        if bar is not None:
            bar.close()
        barrier()
        if info.is_main:
            _merge(folder, out, num_items)
            job.finish()
    barrier()
    return out


def _run_blocks(process: BatchFn, blocks: list[list[int]]) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    results = [process(block) for block in blocks]
    images = np.concatenate([r[0] for r in results])
    labels = None if any(r[1] is None for r in results) else np.concatenate([r[1] for r in results])
    return [i for block in blocks for i in block], images, labels


def _merge(folder: Path, out: Path, num_items: int) -> None:
    """Assembles the parts (each index exactly once) into `out` in index order."""
    found = _read_parts(folder)
    indices = np.concatenate([p[0] for p in found])
    order = np.argsort(indices, kind="stable")
    if len(indices) != num_items or not np.array_equal(indices[order], np.arange(num_items)):
        raise UserInputError(f"{folder}: parts hold {len(np.unique(indices))} distinct of {num_items} images "
                             f"({len(indices)} in all); rerun the same command to finish")
    images = np.concatenate([p[1] for p in found])[order]
    labels = None if any(p[2] is None for p in found) else np.concatenate([p[2] for p in found])[order]
    save_samples(out, images, labels, overwrite=True)  # refuse_finished already ruled on `out`
