"""Sample files: every read and write of generated images, as OpenAI .npz or a folder of PNGs.

On disk a sample file follows OpenAI's .npz layout: `arr_0` uint8 NHWC and optional `arr_1`
integer labels (a PNG folder carries an optional labels.txt). In memory images are uint8 NCHW
numpy arrays, or float NCHW tensors once converted. Three ways to read the same file:
`load_samples` (whole), `map_samples` (memory-mapped when the npz is stored uncompressed) and
`open_samples` (streamed in batches, for metrics over 50k images). All three parse the .npy
headers with the same code, which checks a declared shape against the bytes the file holds before
anything is allocated, and name the file in every error.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cmboost.errors import OutputExistsError, UserInputError
from cmboost.files.atomic import atomic_open, check_writable, refuse_output_inside_inputs, refuse_unsafe_output
from cmboost.files.npz import NpyMember, image_member, labels_member, open_zip, read_member, write_npz
from cmboost.files.png import SAMPLES_MARKER, load_png_folder, not_replaceable, save_png_folder
from cmboost.files.sample_checks import check_samples

__all__ = ["to_float", "to_uint8", "check_samples", "load_samples", "map_samples", "open_samples",
           "save_samples", "check_sample_output", "convert_samples", "write_npz", "ImageSource", "ArraySource",
           "NpzSource", "SAMPLES_MARKER"]


# ----------------------------------------------------------------------------- conversions

def to_float(images: np.ndarray | torch.Tensor, value_range: str = "unit") -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW in [0, 1] ("unit") or [-1, 1] ("signed")."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise UserInputError(f"expected uint8 images, got {x.dtype}")
    x = x.float() / 255.0
    if value_range == "signed":
        return x * 2.0 - 1.0
    if value_range != "unit":
        raise UserInputError(f"value range {value_range!r}: choose 'unit' or 'signed'")
    return x


def to_uint8(images: torch.Tensor | np.ndarray, value_range: str = "unit") -> np.ndarray:
    """float NCHW in [0, 1] or [-1, 1] -> uint8 NCHW, rounding to the nearest level (never truncating)."""
    x = torch.as_tensor(images).detach().float().cpu()
    if not torch.isfinite(x).all():
        raise UserInputError("images contain NaN or inf")
    if value_range == "signed":
        x = (x + 1.0) * 127.5
    elif value_range == "unit":
        x = x * 255.0
    else:
        raise UserInputError(f"value range {value_range!r}: choose 'unit' or 'signed'")
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- checks


# ----------------------------------------------------------------------------- .npz members


# ----------------------------------------------------------------------------- reading

def load_samples(path: str | os.PathLike, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads an OpenAI-format .npz (`arr_0` uint8 NHWC, optional `arr_1` labels) or a folder of PNGs
    (with an optional labels.txt). Returns uint8 NCHW and int64 labels (or None)."""
    path = Path(path)
    if path.is_dir():
        return load_png_folder(path, num_classes)
    with open_zip(path) as archive:
        member = image_member(archive, path)
        labels = labels_member(archive, path)
        images = read_member(archive, path, member)
    # A copy, not ascontiguousarray: with one channel the transposed view already counts as contiguous but
    # keeps NHWC strides, which torch reads as channels-last and convolves with other kernels.
    images = images.transpose(0, 3, 1, 2).copy(order="C")
    check_samples(images, labels, str(path), num_classes)
    return images, labels


def map_samples(path: str | os.PathLike, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Like `load_samples`, but an uncompressed .npz's `arr_0` is memory-mapped (an NCHW view), so a
    50k-image file costs no memory until a batch is sliced. Other inputs are read whole."""
    path = Path(path)
    if path.is_dir():
        return load_samples(path, num_classes)
    with open_zip(path) as archive:
        member = image_member(archive, path)
        if member.info.compress_type != zipfile.ZIP_STORED or member.fortran:
            return load_samples(path, num_classes)
        labels = labels_member(archive, path)
    with open(path, "rb") as fh:
        # The data sit after the local file header (30 bytes + name + extra) and the .npy header.
        fh.seek(member.info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise UserInputError(f"{path}: damaged zip entry for arr_0")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = member.info.header_offset + 30 + name_len + extra_len + member.header_len
    if offset + member.nbytes > path.stat().st_size:
        raise UserInputError(f"{path}: arr_0 is truncated")
    images = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=member.shape).transpose(0, 3, 1, 2)
    check_samples(images, labels, str(path), num_classes)
    return images, labels


class ImageSource:
    """Images delivered in consecutive uint8 NCHW batches, without holding them all when streaming."""

    name: str = ""
    shape: tuple[int, int, int] = (0, 0, 0)

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError


class ArraySource(ImageSource):
    def __init__(self, images: np.ndarray, name: str = "images"):
        check_samples(images, None, name)
        self.images, self.name, self.shape = images, name, tuple(int(v) for v in images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.images), batch_size):
            yield self.images[start : start + batch_size]


class NpzSource(ImageSource):
    """`arr_0` of an OpenAI-layout .npz (uint8 NHWC, C order), read batch by batch from the zip member."""

    def __init__(self, path: str | os.PathLike, member: NpyMember | None = None):
        """`member`: arr_0's header when the caller has read it already (it is read here otherwise, and
        once only: the batches seek to the data it locates)."""
        self.path = Path(path)
        self.name = str(path)
        if member is None:
            with open_zip(self.path) as archive:
                member = image_member(archive, self.path)
        self.member = member
        if member.fortran:
            raise UserInputError(f"{path}: arr_0 is in Fortran order and cannot be streamed; "
                                 f"open it with open_samples, which reads it whole")
        n, h, w, c = member.shape
        self.count, self.shape = n, (c, h, w)

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        c, h, w = self.shape
        per_image = h * w * c
        member = self.member
        with open_zip(self.path) as archive:
            with archive.open(member.info) as fh:
                fh.seek(member.header_len)
                for start in range(0, self.count, batch_size):
                    n = min(batch_size, self.count - start)
                    try:
                        raw = fh.read(n * per_image)
                    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                        raise UserInputError(f"{self.path}: damaged arr_0 ({err})") from None
                    if len(raw) != n * per_image:
                        raise UserInputError(f"{self.path}: arr_0 is truncated at image {start + len(raw) // per_image}")
                    batch = np.frombuffer(raw, dtype=np.uint8).reshape(n, h, w, c)
                    yield np.array(batch.transpose(0, 3, 1, 2), order="C")  # a writable copy


def open_samples(path: str | os.PathLike) -> ImageSource:
    """A C-order .npz streams its arr_0; a folder of PNGs or a Fortran-order arr_0 is read whole."""
    path = Path(path)
    if path.is_dir():
        return ArraySource(load_samples(path)[0], str(path))
    if not path.exists():
        raise UserInputError(f"{path}: file not found")
    with open_zip(path) as archive:
        member = image_member(archive, path)  # the header, read once for the whole evaluation
    return ArraySource(load_samples(path)[0], str(path)) if member.fortran else NpzSource(path, member)


# ----------------------------------------------------------------------------- writing

def _sample_output_kind(path: Path, flag: str) -> str:
    """"npz" for a name ending in .npz, "png" (a folder of PNGs) for a name without a suffix; any other
    suffix is refused, so the format never differs from the one the name promises."""
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == "":
        return "png"
    raise UserInputError(f"{flag} {path}: a sample output is an .npz file (a name ending in .npz) or a folder "
                         f"of PNGs (a name without a suffix); {path.suffix!r} is neither, so nothing is written")


def check_sample_output(path: str | os.PathLike, overwrite: bool, flag: str = "--out", resuming: bool = False) -> None:
    """Every check on a sample output, before any work and changing nothing: the path is not empty, the
    current folder or one above it; its suffix is .npz (a file) or none (a folder of PNGs); an existing
    output is replaced only with `overwrite` (or when `resuming` a job that wrote it), and only by its
    own kind, a folder only when cmboost wrote it; the folder above can be written."""
    refuse_unsafe_output(path, flag)
    path = Path(path)
    kind = _sample_output_kind(path, flag)
    if path.exists() or path.is_symlink():
        reason = not_replaceable(path, kind)
        if reason is not None:
            raise UserInputError(reason)
        if not overwrite and not resuming:
            raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")
    check_writable(path)


def save_samples(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
                 overwrite: bool = False) -> Path:
    """Writes uint8 NCHW `images` (and labels) as an OpenAI .npz (path ends in .npz) or as a folder of
    PNGs with labels.txt and the cmboost marker (a path without a suffix; any other suffix is refused).
    Atomic: a temp file or folder beside the target, then a rename. See `check_sample_output` for
    what an existing output must be to be replaced."""
    path = Path(path)
    images = np.asarray(images)
    labels = None if labels is None else np.asarray(labels)
    check_samples(images, labels, str(path))
    check_sample_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        arrays = {"arr_0": np.ascontiguousarray(images.transpose(0, 2, 3, 1))}
        if labels is not None:
            arrays["arr_1"] = labels.astype(np.int64)
        with atomic_open(path, "wb") as fh:
            write_npz(fh, arrays)
        return path
    return save_png_folder(path, images, labels, overwrite)


def convert_samples(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False):
    """Rewrites a sample file as another layout (.npz <-> PNG folder); returns (images, labels)."""
    check_sample_output(out, overwrite)
    refuse_output_inside_inputs(out, [("the input", source)])
    images, labels = load_samples(source)
    save_samples(out, images, labels, overwrite=overwrite)
    return images, labels
