"""Resumable jobs: one `Job` folder for everything cmboost resumes.

A `Job` is a folder that holds what a long computation needs to resume after it is stopped at any
moment (kill -9 included):

- `config.json`: the configuration the result depends on. A rerun compares it with its own and,
  on any difference outside the fields allowed to change, refuses in one line that names the first
  differing field (`check_same_config`, the one comparison);
- `.lock`: held for the job's lifetime, so two processes never write the same job;
- the cache of finished work, in one of three shapes:
  - part files (`part-<first index>-<count>.npz`): index-to-image jobs (sample, boost), see `run_parts`;
  - rows (`rows.json`, a JSON object of finished results by key): tune's candidates, the judge
    check's judges, the demo's rows;
  - a training state (`state.safetensors`, EDM2-style: one file with every tensor of the run and its
    step; `save_state`/`load_state`) and `log.jsonl`: the three trainers (train-jcd, train-cm,
    train-features).

A job that writes one output file keeps its folder next to it (`<out>.job`, `job_dir`) and removes
it once the output is written; a trainer's job is its --run-dir and the demo's its --out-dir, which
are kept. A job that fails before it has cached anything leaves no folder behind.

A `.job` folder is cmboost's alone: cmboost writes `.cmboost-job` into it first, adopts an existing
one only when it holds that marker (or, made by an older cmboost, a readable `config.json`; an empty
folder is one a killed run had just made), and refuses any other folder, or a symbolic link, in one
line that touches nothing. Removing it removes only the files cmboost writes (`remove_job_folder`),
so a file of the user's found there survives; a refusal removes nothing it did not create itself.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_write_text, check_writable
from cmboost.files.checkpoints import check_fits, read_safetensors, save_safetensors
from cmboost.jobs.config import as_json, check_same_config, read_record, write_record
from cmboost.jobs.training_state import load_optimizer, tensors_under
from cmboost.runtime import barrier, dist_info

CONFIG_FILE, LOCK_FILE, ROWS_FILE = "config.json", ".lock", "rows.json"
STATE_FILE, LOG_FILE, MODEL_FILE = "state.safetensors", "log.jsonl", "model.safetensors"  # MODEL_FILE: a trainer's result
STATE_FORMAT = "cmboost.training_state/1"
MARKER_FILE = ".cmboost-job"  # written first into every `.job` folder cmboost makes: the folder is cmboost's
_MARKER_TEXT = "a cmboost job folder: cmboost removes it once the job's output is written\n"


# ----------------------------------------------------------------------------- configurations


def job_dir(out: str | os.PathLike) -> Path:
    """The job folder of a job whose result is the one file (or PNG folder) `out`."""
    out = Path(out)
    return out.with_name(out.name + ".job")


def is_private_job_folder(folder: str | os.PathLike) -> bool:
    """A folder `job_dir` names (`<out>.job`): cmboost's alone, unlike a trainer's --run-dir or the
    demo's --out-dir, which the user names and may keep other files in."""
    return Path(folder).name.endswith(".job")


def _is_cmboost_file(name: str) -> bool:
    """A file cmboost writes in a job folder, or the temp file of one of its atomic writes
    (`.<name>.<random>.tmp`, left by a run killed mid-write)."""
    if name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3:
        name = name[1:].rsplit(".", 2)[0]
    if name in (MARKER_FILE, CONFIG_FILE, LOCK_FILE, ROWS_FILE, STATE_FILE, LOG_FILE):
        return True
    return name.startswith("part-") and name.endswith(".npz")


def _is_leftover(name: str) -> bool:
    """The lock, or the temp file of an atomic write: what a run killed before writing anything whole
    leaves in its job folder."""
    return name == LOCK_FILE or (name != MARKER_FILE and name.startswith(".") and name.endswith(".tmp")
                                 and _is_cmboost_file(name))


def check_job_folder(folder: str | os.PathLike, name: str | None = None) -> None:
    """Refuses, in one line naming it and changing nothing, a `.job` folder cmboost did not make: a
    symbolic link, a file, or a folder holding neither the marker nor a readable `config.json` (an
    older cmboost's job); an absent or empty folder is fine. Verbs call it before any work."""
    folder = Path(folder)
    name = name or str(folder)
    fix = "move it away, or choose another output"
    if folder.is_symlink():
        raise UserInputError(f"{name}: is a symbolic link; a job folder is cmboost's alone, so cmboost neither "
                             f"follows nor removes it: {fix}")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserInputError(f"{name}: is a file, where this job keeps its folder; {fix}")
    if (folder / MARKER_FILE).is_file():
        return
    try:
        if all(_is_leftover(path.name) for path in folder.iterdir()):
            return  # made by a run killed before its first whole write: nothing of anyone's to lose
        record = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise UserInputError(f"{name}: a folder cmboost did not make (no {MARKER_FILE} and no readable "
                             f"{CONFIG_FILE}), where this job would keep its files; it is left untouched: {fix}")


def remove_job_folder(folder: str | os.PathLike) -> None:
    """Removes a finished job's folder: the files cmboost wrote there, then the folder if that empties
    it (a file of anyone else's stays, and so does its folder). A symbolic link is never followed."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return
    for path in folder.iterdir():
        if _is_cmboost_file(path.name) and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


# ----------------------------------------------------------------------------- the job

@contextlib.contextmanager
def _locked(folder: Path, name: str) -> Iterator[None]:
    """An exclusive lock on the job folder for the job's lifetime; the kernel drops it if the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = folder / LOCK_FILE
    fh = open(path, "a")
    busy = UserInputError(f"{name}: another cmboost run is writing this job now; wait for it, or choose another output")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        try:  # the lock file is removed at the end, so a lock on a file already removed is no lock
            if os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino:
                raise busy
        except FileNotFoundError:
            raise busy from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: the job's end leaves no lock file behind
    finally:
        fh.close()


class Job:
    """One resumable job: its folder, recorded configuration, lock and cache (see the module docstring).

    Use it as a context manager. Entering it (rank 0 does the writing, every rank waits for it):
    checks that the folder can be written, takes the lock, and either records `config` (a new job)
    or compares it with the recorded one (a resumed job) and refuses another run's folder; with
    `restart`, the cache is emptied first. Leaving it lets the lock go, and removes the folder when
    nothing was cached (a job that failed early leaves nothing behind).

    `name` is how messages call the folder (a flag and path, e.g. "--run-dir runs/x"), `fresh` how
    the user starts over, `may_change` the fields a rerun may change (they take their new values),
    and `as_flags` names a differing field as the flag that sets it. `row_problem(key, row)` says
    what is wrong with a cached row (None when it is whole), so a damaged `rows.json` is refused on
    read, naming the file and the key, instead of failing wherever the row is used."""

    def __init__(self, folder: str | os.PathLike, config: Mapping, *, may_change: Sequence[str] = (),
                 name: str | None = None, fresh: str | None = None, as_flags: bool = False, restart: bool = False,
                 row_problem: Callable[[str, object], str | None] | None = None):
        self.folder = Path(folder)
        self.config = as_json(dict(config))
        self.may_change = tuple(may_change)
        self.name = name or str(self.folder)
        self.fresh = fresh or f"delete {self.folder} to start over"
        self.as_flags = as_flags
        self.restart = restart
        self.row_problem = row_problem
        self.resumed = False  # True once entered, when the folder held this job's configuration
        self._rows: dict | None = None
        self._stack: contextlib.ExitStack | None = None

    # -- lifetime
    def __enter__(self) -> "Job":
        info = dist_info()
        stack = contextlib.ExitStack()
        created: list[Path] = []  # what this run made, the only things a refusal may remove
        try:
            if info.is_main:
                private = is_private_job_folder(self.folder)
                if private:
                    check_job_folder(self.folder, self.name)
                check_writable(self.folder / CONFIG_FILE)
                if self.folder.exists() and not self.folder.is_dir():
                    raise UserInputError(f"{self.name}: is a file, where this job keeps its folder; move it away, "
                                         f"or choose another output")
                if not self.folder.is_dir():
                    self.folder.mkdir(parents=True)
                    created.append(self.folder)
                marker = self.folder / MARKER_FILE
                if private and not marker.exists() and all(_is_leftover(p.name) for p in self.folder.iterdir()):
                    atomic_write_text(marker, _MARKER_TEXT)  # first, so a killed run's folder is still ours
                    created.append(marker)
                if not (self.folder / LOCK_FILE).exists():
                    created.append(self.folder / LOCK_FILE)
                stack.enter_context(_locked(self.folder, self.name))
                if self.restart:
                    self.clear()
                self._prepare()
                if private and not marker.exists():  # an older cmboost's job, adopted
                    atomic_write_text(marker, _MARKER_TEXT)
                stack.callback(self._remove_if_empty)  # runs before the lock is let go
            barrier()
            if not info.is_main:
                self.resumed = (self.folder / CONFIG_FILE).is_file() and any(self._cached())
        except BaseException:
            stack.close()
            self._remove_created(created)
            raise
        self._stack = stack
        return self

    @staticmethod
    def _remove_created(created: list[Path]) -> None:
        """Undoes a refused start: removes what it created (newest first), nothing else."""
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _prepare(self) -> None:
        saved = read_record(self.folder / CONFIG_FILE, self.fresh)
        if saved is not None:
            check_same_config(saved, self.config, self.name, self.may_change, self.fresh, self.as_flags)
            self.resumed = True
        elif any(self._cached()):
            raise UserInputError(f"{self.name}: holds results without a recorded configuration (an older or "
                                 f"foreign job); {self.fresh}")
        write_record(self.folder / CONFIG_FILE, self.config)  # a changeable field takes its new value

    def _cached(self) -> Iterator[Path]:
        yield from self.folder.glob("part-*.npz")
        for name in (ROWS_FILE, STATE_FILE, LOG_FILE):
            if (self.folder / name).exists():
                yield self.folder / name

    def clear(self) -> None:
        """Forgets every cached result and the recorded configuration (a restart)."""
        for path in list(self._cached()) + [self.folder / CONFIG_FILE]:
            path.unlink(missing_ok=True)
        self._rows = None

    def _remove_if_empty(self) -> None:
        if not self.folder.is_dir() or any(self._cached()):
            return
        for name in (CONFIG_FILE, LOCK_FILE, MARKER_FILE):
            (self.folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a folder holding the user's own files stays
            self.folder.rmdir()

    def finish(self) -> None:
        """Removes the folder of a job whose output is written (rank 0, inside the `with`): only the
        files cmboost wrote there (`remove_job_folder`)."""
        remove_job_folder(self.folder)

    # -- rows
    @property
    def rows(self) -> dict:
        """The finished rows, by key (read once)."""
        if self._rows is None:
            saved = read_record(self.folder / ROWS_FILE, self.fresh)
            for key, row in (saved or {}).items():
                problem = self.row_problem(key, row) if self.row_problem is not None else None
                if problem is not None:
                    raise UserInputError(f"{self.folder / ROWS_FILE}: {key}: {problem}; {self.fresh}")
            self._rows = {} if saved is None else saved
        return self._rows

    def row(self, key: str):
        return self.rows.get(key)

    def put_row(self, key: str, value):
        """Caches one finished row (atomically) and returns it."""
        self.rows[key] = as_json(value)
        write_record(self.folder / ROWS_FILE, self.rows)
        return self.rows[key]

    # -- training state
    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def save_state(self, step: int, tensors: Mapping, meta: Mapping) -> Path:
        """The whole training state at `step`: tensors by name, JSON-able `meta` (optimizer groups,
        scheduler, RNG...), in one safetensors file written atomically (rank 0)."""

        header = {"format": STATE_FORMAT, "step": str(int(step)), "meta": json.dumps(as_json(dict(meta)), sort_keys=True)}
        return save_safetensors(self.state_path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, header)

    def load_state(self, meta_keys: Sequence[str] = ("optimizer_groups",)) -> tuple[int, dict, dict] | None:
        """(step, tensors, meta) of the saved training state, or None when there is none yet; a state
        whose meta lacks one of `meta_keys` is refused in one line naming the file and the key."""

        if not self.state_path.is_file():
            return None
        fix = f"it is this run's training state: {self.fresh}"
        try:
            tensors, header = read_safetensors(self.state_path)
        except UserInputError as err:
            raise UserInputError(f"{err}; {fix}") from None
        if header.get("format") != STATE_FORMAT:
            raise UserInputError(f"{self.state_path}: not a cmboost training state (format "
                                 f"{header.get('format')!r}); {fix}")
        try:
            step, meta = int(header["step"]), json.loads(header["meta"])
        except (KeyError, ValueError) as err:
            raise UserInputError(f"{self.state_path}: damaged training state ({err}); {fix}") from None
        if not isinstance(meta, dict):
            raise UserInputError(f"{self.state_path}: damaged training state (meta is not a JSON object); {fix}")
        for key in meta_keys:
            if key not in meta:
                raise UserInputError(f"{self.state_path}: damaged training state (meta.{key} missing); {fix}")
        return step, tensors, meta

    def restore(self, prefix: str, module, tensors: Mapping) -> None:
        """Loads the state's `prefix.` tensors into `module`; a state of another network (other keys or
        shapes) is refused in one line naming the file, never a load_state_dict traceback."""

        state = tensors_under(prefix, tensors)
        try:
            check_fits(module.state_dict(), state, self.state_path, f"this run's network ({prefix})")
        except UserInputError as err:
            raise UserInputError(f"{err}; it is another run's training state: {self.fresh}") from None
        module.load_state_dict(state)

    def restore_optimizer(self, optimizer, tensors: Mapping, groups) -> None:
        """`load_optimizer`, with a state that does not fit the optimizer refused in one line."""
        try:
            load_optimizer(optimizer, tensors, groups)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise UserInputError(f"{self.state_path}: its optimizer state does not fit this run's ({err}); it is "
                                 f"another run's training state: {self.fresh}") from None

    # -- log
    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE

    def append_log(self, record: dict) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def trim_log(self, last: float, key: str) -> None:
        """Drops log lines written after the state a resume starts from (and torn lines)."""
        if not self.log_path.exists():
            return

        def position(line: str) -> float:
            try:
                return float(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                return float("inf")

        kept = [line for line in self.log_path.read_text().splitlines() if position(line) <= last]
        atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- index-to-image jobs


