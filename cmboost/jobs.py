"""Resumable jobs: recorded configurations, index-to-image jobs kept as part files, trainer run folders.

Every long job records the configuration its result depends on, and a rerun compares against it
with `check_same_config` (the one comparison), naming the first field that differs. Two shapes of
job use it:

- `run_parts`: a job that turns sample indices into images (sample, boost). The indices fall into
  fixed compute blocks (block b holds b*block_size .. (b+1)*block_size-1), and the work function
  always sees exactly one block, so an image never depends on the batch size or the number of
  processes. A batch (whole blocks) becomes an atomic part file in `<out>.parts/` holding its
  indices; a rerun skips the blocks already done, so a job killed at any moment (kill -9
  included) resumes. Under torchrun the batches are dealt round-robin to the ranks and rank 0
  merges the parts in index order.
- `RunDir`: a trainer's folder with its recorded configuration and `log.jsonl`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from cmboost.atomic import atomic_open, atomic_write_text, check_writable, refuse_unsafe_output
from cmboost.errors import UserInputError
from cmboost.runtime import barrier, dist_info
from cmboost.samples import check_sample_output, save_samples, write_npz

BatchFn = Callable[[Sequence[int]], tuple[np.ndarray, np.ndarray | None]]
CONFIG_FILE = "config.json"
LOCK_FILE = "lock"
_MISSING = "<absent>"


# ----------------------------------------------------------------------------- configurations

def as_json(value):
    """`value` as it reads back from JSON (tuples become lists), so saved and live records compare equal."""
    return json.loads(json.dumps(value))


def first_difference(saved: dict, current: dict, may_change: Sequence[str] = ()) -> tuple[str, object, object] | None:
    """(dotted key, saved value, current value) of the first field that differs, or None."""
    saved, current = as_json(saved), as_json(current)
    for key in list(current) + [k for k in saved if k not in current]:
        if key in may_change:
            continue
        old, new = saved.get(key, _MISSING), current.get(key, _MISSING)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            sub, old, new = first_difference(old, new)
            return f"{key}.{sub}", old, new
        return key, old, new
    return None


def check_same_config(saved: dict, current: dict, where: str | os.PathLike, may_change: Sequence[str] = (),
                      fresh: str = "delete it to start over", as_flags: bool = False) -> None:
    """Refuses, in one line naming `where` and the first differing field, to resume another run.
    With `as_flags` the field is named as the command-line flag that sets it."""
    diff = first_difference(saved, current, may_change)
    if diff is not None:
        key, old, new = diff
        if as_flags:
            key = "--" + key.replace("_", "-")
        raise UserInputError(f"{where}: holds a run with another configuration ({key} was {old!r}, now {new!r}); "
                             f"it cannot resume under other settings: rerun the same command, or {fresh}")


def read_record(path: Path, fresh: str = "delete it to start over") -> dict | None:
    """A recorded JSON configuration, None when absent; a torn or foreign one is named with its fix."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserInputError(f"{path}: unreadable ({err.strerror}); {fresh}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: damaged record ({err}); {fresh}") from None
    if not isinstance(record, dict):
        raise UserInputError(f"{path}: not a cmboost record (a JSON object); {fresh}")
    return record


def write_record(path: Path, record: dict) -> Path:
    return atomic_write_text(path, json.dumps(as_json(record), indent=2, sort_keys=True) + "\n")


def file_digest(path: str | os.PathLike) -> str:
    """A content hash of a file or of a folder's files, so a resumed job notices a replaced input."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


# ----------------------------------------------------------------------------- part files

def parts_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def refuse_finished(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuses an existing output unless asked to overwrite it, or unless its parts folder is still
    there (a job killed between writing the output and cleaning up: rerunning finishes it); and
    whatever `check_sample_output` refuses (a bad path or suffix, an output of another kind or a
    folder cmboost did not write), with or without --overwrite."""
    refuse_unsafe_output(out)  # before parts_dir, which cannot name the parts of "" or "."
    parts = parts_dir(out)
    if parts.exists() and not parts.is_dir():
        raise UserInputError(f"{parts}: is a file, where this job keeps its part files; move it away, or choose "
                             f"another --out")
    check_sample_output(out, overwrite, resuming=(parts / CONFIG_FILE).is_file())


@contextlib.contextmanager
def _locked(parts: Path) -> Iterator[None]:
    """An exclusive lock on the parts folder for the job's lifetime; the kernel drops it if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    fh = open(parts / LOCK_FILE, "a")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(f"{parts}: another cmboost run is writing this output now; wait for it, "
                                 f"or choose another output") from None
        yield
    finally:
        fh.close()


def _part_name(indices: Sequence[int]) -> str:
    return f"part-{int(indices[0]):09d}-{len(indices):06d}.npz"


def _write_part(parts: Path, indices: Sequence[int], images: np.ndarray, labels: np.ndarray | None) -> None:
    arrays = {"indices": np.asarray(indices, dtype=np.int64), "images": images}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    with atomic_open(parts / _part_name(indices), "wb") as fh:
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


def _drop_damaged_parts(parts: Path) -> None:
    """Removes every part file that cannot be read whole, naming it: its blocks count as not done,
    so this run recomputes them (atomic writes mean only an outside hand can damage a part)."""
    for file in sorted(parts.glob("part-*.npz")):
        try:
            _load_part(file)
        except _DamagedPart as err:
            print(f"cmboost: {file}: damaged part file ({err}); removed, its images are computed again",
                  file=sys.stderr, flush=True)
            file.unlink(missing_ok=True)


def _read_parts(parts: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    found = []
    for file in sorted(parts.glob("part-*.npz")):
        try:
            found.append(_load_part(file))
        except _DamagedPart as err:
            # damaged after this run checked it: it is removed, and the next run recomputes it
            file.unlink(missing_ok=True)
            raise UserInputError(f"{file}: damaged part file ({err}); removed it: rerun the same command to "
                                 f"compute that batch again") from None
    return found


def _done_indices(parts: Path) -> set[int]:
    """The indices the part files hold (their `indices` members only: `_drop_damaged_parts` has
    already read each part whole)."""
    done: set[int] = set()
    for file in sorted(parts.glob("part-*.npz")):
        try:
            with np.load(file, allow_pickle=False) as archive:
                done.update(int(i) for i in archive["indices"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise UserInputError(f"{file}: damaged part file ({err}); delete it and rerun the same command "
                                 f"to compute that batch again") from None
    return done


def _prepare_parts(parts: Path, config: dict, may_change: Sequence[str]) -> None:
    """Checks the recorded configuration of an unfinished job, or records it for a new one."""
    fresh = f"delete {parts} to start over"
    saved = read_record(parts / CONFIG_FILE, fresh)
    if saved is not None:
        check_same_config(saved, config, parts, may_change, fresh)
    elif any(parts.glob("part-*.npz")):
        raise UserInputError(f"{parts}: part files without a recorded configuration (an older or foreign "
                             f"job); {fresh}")
    write_record(parts / CONFIG_FILE, config)  # a changeable field (batch size) takes its new value
    _drop_damaged_parts(parts)


def run_parts(out: str | os.PathLike, num_items: int, batch_size: int, process: BatchFn, config: dict,
              may_change: Sequence[str] = (), overwrite: bool = False, progress: bool = True,
              desc: str = "images", block_size: int = 1) -> Path:
    """Runs `process(indices) -> (uint8 NCHW images, labels or None)` over indices 0..num_items-1,
    resumably, and writes `out` (.npz or PNG folder). `process` is called once per compute block
    (`block_size` consecutive indices; the last block may be shorter); `batch_size` only sets how
    many images a part file holds, rounded up to whole blocks. `config` must name everything the
    result depends on; only the fields in `may_change` may differ when a rerun resumes."""
    out = Path(out)
    info = dist_info()
    if num_items < 1:
        raise UserInputError(f"{out}: nothing to do (0 images)")
    if batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: must be at least 1")
    if block_size < 1:
        raise UserInputError(f"--block-size {block_size}: must be at least 1")
    refuse_finished(out, overwrite)
    parts = parts_dir(out)
    config = dict(config, num_items=num_items, batch_size=batch_size, block_size=block_size)
    with contextlib.ExitStack() as stack:
        if info.is_main:
            parts.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(parts))
            stack.callback(_remove_if_empty, parts)  # runs before the lock is let go
            _prepare_parts(parts, config, may_change)
        barrier()
        done = _done_indices(parts)
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
            _write_part(parts, indices, images, labels)
            if bar is not None:
                bar.update(len(indices) * info.world_size)
        if bar is not None:
            bar.close()
        barrier()
        if info.is_main:
            _merge(parts, out, num_items)
    barrier()
    return out


def _run_blocks(process: BatchFn, blocks: list[list[int]]) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    results = [process(block) for block in blocks]
    images = np.concatenate([r[0] for r in results])
    labels = None if any(r[1] is None for r in results) else np.concatenate([r[1] for r in results])
    return [i for block in blocks for i in block], images, labels


def _remove_if_empty(parts: Path) -> None:
    """After a clean error before any batch was written, nothing is left behind."""
    if parts.is_dir() and not any(parts.glob("part-*.npz")):
        shutil.rmtree(parts, ignore_errors=True)


def _merge(parts: Path, out: Path, num_items: int) -> None:
    """Assembles the parts (each index exactly once) into `out` in index order, then removes them."""
    found = _read_parts(parts)
    indices = np.concatenate([p[0] for p in found])
    order = np.argsort(indices, kind="stable")
    if len(indices) != num_items or not np.array_equal(indices[order], np.arange(num_items)):
        raise UserInputError(f"{parts}: parts hold {len(np.unique(indices))} distinct of {num_items} images "
                             f"({len(indices)} in all); rerun the same command to finish")
    images = np.concatenate([p[1] for p in found])[order]
    labels = None if any(p[2] is None for p in found) else np.concatenate([p[2] for p in found])[order]
    save_samples(out, images, labels, overwrite=True)  # refuse_finished already ruled on `out`
    shutil.rmtree(parts, ignore_errors=True)


# ----------------------------------------------------------------------------- trainer run folders

class RunDir:
    """A trainer's folder: its recorded configuration (compared on every rerun) and `log.jsonl`."""

    def __init__(self, path: str | os.PathLike, config_name: str = CONFIG_FILE, log_name: str = "log.jsonl"):
        self.path = Path(path)
        self.config_path = self.path / config_name
        self.log_path = self.path / log_name
        self.fresh = "use a new --run-dir"

    def saved_config(self) -> dict | None:
        return read_record(self.config_path, self.fresh)

    def check(self, config: dict, may_change: Sequence[str] = ()) -> bool:
        """True when the folder holds a run of `config` (to resume); refuses another run's folder, or
        one that cannot be written."""
        check_writable(self.config_path)
        saved = self.saved_config()
        if saved is not None:
            check_same_config(saved, config, f"--run-dir {self.path}", may_change, self.fresh, as_flags=True)
        return saved is not None

    def record(self, config: dict) -> None:
        """Records the configuration of a new run (rank 0 only)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_record(self.config_path, config)

    def append_log(self, record: dict) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def trim_log(self, last: float, key: str) -> None:
        """Drops log lines written after the checkpoint a resume starts from (and torn lines)."""
        if not self.log_path.exists():
            return

        def position(line: str) -> float:
            try:
                return float(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                return float("inf")

        kept = [line for line in self.log_path.read_text().splitlines() if position(line) <= last]
        atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))
