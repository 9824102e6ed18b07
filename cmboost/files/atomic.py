"""Output files: atomic writes (a temp file beside the target, then a rename), never over an existing file unless asked.

A reader (or a rerun after kill -9) sees either the old file or the whole new one, never a partial
write: os.replace is atomic within one filesystem, which is why the temp file lives in the same folder.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from cmboost.errors import OutputExistsError, UserInputError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask has no getter)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temp Path beside `path` (its folder is created) to write to. On normal exit the temp
    file gets the usual permissions (0666 less the umask; mkstemp makes 0600) and replaces `path`;
    on any exception it is removed and the exception goes on. `suffix` lets writers that pick the
    format from the name (PIL) see the right extension."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _naming(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """The error with the output's path as its filename: a full disk reports no file of its own."""
    return type(err)(err.errno, err.strerror or str(err), str(path)) if err.errno else err


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yields a file open for writing on a temp path beside `path`; it is closed, then renamed onto
    `path`. Text modes use UTF-8."""
    if not mode.startswith(("w", "x")) or "+" in mode:
        raise ValueError(f"atomic_open mode {mode!r}: use a write mode ('wb' or 'w')")
    mode = "w" + mode[1:]  # the temp file already exists, so "x" would fail
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def refuse_unsafe_output(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuses, in one line naming `flag`, an output path that is empty, the current folder, the root
    or any folder above the current one: replacing an output replaces it whole, so such a path could
    only ever wreck the user's files. (An unset shell variable gives `--out ""`, and Path("") is ".".)"""
    text = os.fspath(path)
    if text in ("", "."):
        raise UserInputError(f"{flag} is empty (or '.'), which names the current folder; an output never "
                             f"replaces that: give a new file or folder name")
    target = Path(text).resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted: only the root is left to guard
        cwd = None
    if target == cwd:
        raise UserInputError(f"{flag} {text}: is the current folder ({cwd}); an output never replaces that: "
                             f"give a new file or folder name")
    if target == Path(target.anchor):
        raise UserInputError(f"{flag} {text}: is the root folder; an output never replaces that")
    if cwd is not None and target in cwd.parents:
        raise UserInputError(f"{flag} {text}: is {target}, a folder above the current one; an output never "
                             f"replaces that: give a new file or folder name")


def refuse_output_inside_inputs(out: str | os.PathLike, inputs, flag: str = "--out") -> None:
    """Refuses, in one line naming both, an output that is an input folder or lies inside one (a PNG
    folder of samples, a --data folder): written there, the next read would take it for input.
    `inputs`: (how the input is named, e.g. "--samples", its path or None) pairs; files are fine."""
    target = Path(out).absolute().resolve()
    for name, source in inputs:
        if source is None or not Path(source).is_dir():
            continue
        folder = Path(source).absolute().resolve()
        if target == folder or folder in target.parents:
            raise UserInputError(f"{flag} {out}: lies inside {name} {source}, a folder this run reads; the next "
                                 f"read would take the output for input: write it outside that folder")


def refuse_existing(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """Raises OutputExistsError unless `path` is free or `overwrite` was asked for, and a one-line
    UserInputError when it is a folder, could not be written at all, or names the current folder or one above it
    (`flag` is the option that gave it; checked before any work, changing nothing)."""
    refuse_unsafe_output(path, flag)
    if Path(path).is_dir():  # a file never replaces a folder, with or without --overwrite
        raise UserInputError(f"{flag} {path}: is a folder, and this output is a file, so the folder is kept; "
                             f"give a file name")
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")
    check_writable(path)


def check_writable(path: str | os.PathLike) -> None:
    """The nearest existing folder above `path` must be a writable folder (the rest is created)."""
    path = Path(path).absolute()
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserInputError(f"{path}: cannot be written: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserInputError(f"{path}: cannot be written: no permission to write in {parent}")
            return
