"""Sample files as a folder of PNGs: read with their labels, checked for mode and size, and written
under cmboost's marker file."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cmboost.errors import OutputExistsError, UserInputError

_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_PALETTE_MODES = ("P", "PA")
from cmboost.files.sample_checks import check_samples


def load_png_folder(path: Path, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The folder's PNGs as one channel mode: that of its grey (L) or colour (RGB) files, which must
    agree; palette files take it too (their colours, never their palette indices), and a folder of
    palette files only is grey when every colour they show is grey. Alpha is dropped."""
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise UserInputError(f"{path}: no .png files")
    modes = {}
    for file in files:
        try:
            with Image.open(file) as im:
                modes[file] = im.mode
        except OSError as err:
            raise UserInputError(f"{file}: not a readable PNG ({err})") from None
        if modes[file] not in _GRAY_MODES + _COLOUR_MODES + _PALETTE_MODES:
            raise UserInputError(f"{file}: expected 8-bit pixels, got PIL mode {modes[file]}")
    claims = {"L" if mode in _GRAY_MODES else "RGB" for mode in modes.values() if mode not in _PALETTE_MODES}
    if len(claims) > 1:
        grey = next(f for f, m in modes.items() if m in _GRAY_MODES)
        colour = next(f for f, m in modes.items() if m in _COLOUR_MODES)
        raise UserInputError(f"{path}: PNGs differ in channels ({grey.name} is grey, {colour.name} colour)")
    target = claims.pop() if claims else None  # None: palette files only, decided by their colours
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                array = np.asarray(im.convert(target or "RGB"))
        except OSError as err:
            raise UserInputError(f"{file}: not a readable PNG ({err})") from None
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    if target is None and all(im.shape[0] == 3 and (im[0] == im[1]).all() and (im[1] == im[2]).all()
                              for im in images):
        images = [im[:1] for im in images]
    if len({im.shape for im in images}) > 1:
        raise UserInputError(f"{path}: PNGs differ in size or channels")
    labels = None
    label_file = path / "labels.txt"
    if label_file.is_file():
        try:
            labels = np.asarray([int(line) for line in label_file.read_text().split()], dtype=np.int64)
        except ValueError:
            raise UserInputError(f"{label_file}: every line must be one integer label") from None
    images = np.stack(images)
    check_samples(images, labels, str(path), num_classes)
    return images, labels


def save_png_folder(path: Path, images: np.ndarray, labels: np.ndarray | None, overwrite: bool) -> Path:
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        width = max(6, len(str(len(images))))
        for i, image in enumerate(images):
            array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            Image.fromarray(array).save(tmp / f"{i:0{width}d}.png")
        if labels is not None:
            (tmp / "labels.txt").write_text("".join(f"{int(v)}\n" for v in labels))
        (tmp / SAMPLES_MARKER).write_text(json.dumps(MARKER_RECORD) + "\n")
        old = None
        if path.exists() or path.is_symlink():
            # Checked again now: the folder may have changed during a long job since the first check.
            reason = not_replaceable(path, "png")
            if reason is not None:
                raise UserInputError(reason)
            if not overwrite:
                raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)  # set aside, and put back if the new folder cannot take its place
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# Every PNG folder cmboost writes holds this file; --overwrite replaces only such a folder.
SAMPLES_MARKER = ".cmboost-samples"
MARKER_RECORD = {"format": "cmboost-png-samples", "version": 1}
PNG_NAME = re.compile(r"[0-9]+\.png")


def _not_ours(folder: Path) -> str | None:
    """Why `folder` is not a PNG folder that cmboost wrote and may replace, or None when it is: it must
    hold the marker and nothing but the numbered PNGs, labels.txt and the marker."""
    try:
        record = json.loads((folder / SAMPLES_MARKER).read_text())
    except FileNotFoundError:
        return (f"{folder}: a folder not written by cmboost (no {SAMPLES_MARKER} marker), so it is kept; a PNG "
                f"folder from a cmboost older than the marker is kept too: delete it yourself to replace it, "
                f"or choose another --out")
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != MARKER_RECORD["format"]:
        return (f"{folder}: its {SAMPLES_MARKER} marker is not cmboost's, so the folder is kept; delete it "
                f"yourself to replace it, or choose another --out")
    with os.scandir(folder) as entries:
        for entry in entries:
            ours = entry.name in (SAMPLES_MARKER, "labels.txt") or PNG_NAME.fullmatch(entry.name)
            if not (ours and entry.is_file(follow_symlinks=False)):
                return (f"{folder}: holds {entry.name}, which cmboost did not write, so the folder is kept; "
                        f"move that out, or choose another --out")
    return None


def not_replaceable(path: Path, kind: str) -> str | None:
    """Why the existing `path` may not be replaced by a sample output of `kind`, or None: a file is
    replaced only by a file, and a folder only by a PNG folder, and only one that cmboost wrote."""
    if kind == "npz":
        if path.is_dir():
            return f"{path}: is a folder, and an .npz output replaces only a file, so it is kept"
        return None
    if path.is_symlink():
        return f"{path}: is a symbolic link, and a PNG-folder output replaces only a folder cmboost wrote, so it is kept"
    if not path.is_dir():
        return (f"{path}: is a file, and a PNG-folder output (a name without a suffix) replaces only a folder "
                f"cmboost wrote, so it is kept; to write an .npz, end the name in .npz")
    return _not_ours(path)
