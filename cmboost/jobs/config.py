"""A job's configuration record: written once, read back, and compared on resume, naming the first field
that differs; and the digest that ties a job to its input files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_write_text

_MISSING = "<absent>"


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
    """A recorded JSON object, None when absent; a torn or foreign one is named with its fix."""
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
