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

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cmboost.files.atomic import atomic_open, check_writable, refuse_output_inside_inputs, refuse_unsafe_output
from cmboost.errors import OutputExistsError, UserInputError

__all__ = ["to_float", "to_uint8", "check_samples", "load_samples", "map_samples", "open_samples",
           "save_samples", "check_sample_output", "convert_samples", "write_npz", "ImageSource", "ArraySource",
           "NpzSource", "SAMPLES_MARKER"]

# Every PNG folder cmboost writes holds this file; --overwrite replaces only such a folder.
SAMPLES_MARKER = ".cmboost-samples"
_MARKER_RECORD = {"format": "cmboost-png-samples", "version": 1}
_PNG_NAME = re.compile(r"[0-9]+\.png")


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

def check_samples(images: np.ndarray, labels: np.ndarray | None, source: str,
                  num_classes: int | None = None) -> None:
    """Raises UserInputError naming `source` unless images are uint8 NCHW with 1 or 3 channels
    and labels (if any) are one non-negative integer per image below `num_classes`."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise UserInputError(f"{source}: images must be uint8, got {dtype}")
    if images.ndim != 4:
        raise UserInputError(f"{source}: images must have 4 dimensions, got shape {images.shape}")
    if images.shape[1] not in (1, 3):
        raise UserInputError(f"{source}: images must have 1 or 3 channels, got {images.shape[1]}")
    if labels is None:
        return
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{source}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise UserInputError(f"{source}: {len(labels)} labels for {len(images)} images")
    if len(labels) and labels.min() < 0:
        raise UserInputError(f"{source}: negative label {labels.min()}")
    if num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise UserInputError(f"{source}: label {labels.max()} out of range for {num_classes} classes")


def _integer_labels(labels: np.ndarray | None, path: Path) -> np.ndarray | None:
    """`arr_1` as int64, or a clear error when it holds anything but integers."""
    if labels is None:
        return None
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{path}: arr_1 labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------- .npz members

@dataclasses.dataclass(frozen=True)
class NpyMember:
    """One array of an .npz, from its headers alone: where it is, what it declares."""

    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    header_len: int  # bytes of .npy header before the data, inside the member

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def open_zip(path: Path) -> zipfile.ZipFile:
    """An .npz opened as the zip it is, with one clear line when it is missing or not a zip."""
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserInputError(f"{path}: is a folder without PNGs, not an .npz") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise UserInputError(f"{path}: not a readable .npz file ({err})") from None


def _npy_header(fh, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `fh`, left positioned at the data."""
    try:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        return read_header(fh)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserInputError(f"{what}: damaged .npy header ({err})") from None


def npy_member(archive: zipfile.ZipFile, path: Path, name: str) -> NpyMember | None:
    """The header of array `name` ("arr_0") of an opened .npz, or None when absent. A shape that
    needs more bytes than the member holds is refused here, before any allocation."""
    try:
        info = archive.getinfo(f"{name}.npy")
    except KeyError:
        return None
    try:
        with archive.open(info) as fh:
            shape, fortran, dtype = _npy_header(fh, f"{path}: {name}")
            header_len = fh.tell()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserInputError(f"{path}: damaged zip entry for {name} ({err})") from None
    if dtype.hasobject:
        raise UserInputError(f"{path}: {name} holds Python objects; only plain numeric arrays are read")
    member = NpyMember(info, tuple(int(v) for v in shape), bool(fortran), dtype, header_len)
    if member.nbytes > info.file_size - header_len:
        raise UserInputError(f"{path}: {name} declares shape {member.shape} ({member.nbytes} bytes) but holds "
                             f"{max(info.file_size - header_len, 0)} bytes; the file is truncated or damaged")
    return member


def read_member(archive: zipfile.ZipFile, path: Path, member: NpyMember) -> np.ndarray:
    """The whole array of `member`, in its logical (C or Fortran) order."""
    name = member.info.filename[:-4]
    flat = np.empty(member.nbytes, dtype=np.uint8)  # filled in place, so the array is writable
    try:
        with archive.open(member.info) as fh:
            fh.seek(member.header_len)
            got = fh.readinto(memoryview(flat))
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise UserInputError(f"{path}: damaged {name} ({err})") from None
    if got != member.nbytes:
        raise UserInputError(f"{path}: {name} is truncated")
    return flat.view(member.dtype).reshape(member.shape, order="F" if member.fortran else "C")


def _image_member(archive: zipfile.ZipFile, path: Path) -> NpyMember:
    member = npy_member(archive, path, "arr_0")
    if member is None:
        names = ", ".join(n[:-4] if n.endswith(".npy") else n for n in archive.namelist())
        raise UserInputError(f"{path}: no 'arr_0' array (has {names or 'none'})")
    if member.dtype != np.uint8:
        raise UserInputError(f"{path}: arr_0 must be uint8, got {member.dtype}")
    if len(member.shape) != 4:
        raise UserInputError(f"{path}: arr_0 must be NHWC with 4 dimensions, got shape {member.shape}")
    if member.shape[3] not in (1, 3):
        raise UserInputError(f"{path}: arr_0 must have 1 or 3 channels last (NHWC), got shape {member.shape}")
    if member.shape[0] == 0:
        raise UserInputError(f"{path}: arr_0 holds no images")
    return member


def _labels(archive: zipfile.ZipFile, path: Path) -> np.ndarray | None:
    member = npy_member(archive, path, "arr_1")
    return None if member is None else _integer_labels(read_member(archive, path, member), path)


# ----------------------------------------------------------------------------- reading

def load_samples(path: str | os.PathLike, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads an OpenAI-format .npz (`arr_0` uint8 NHWC, optional `arr_1` labels) or a folder of PNGs
    (with an optional labels.txt). Returns uint8 NCHW and int64 labels (or None)."""
    path = Path(path)
    if path.is_dir():
        return _load_png_folder(path, num_classes)
    with open_zip(path) as archive:
        member = _image_member(archive, path)
        labels = _labels(archive, path)
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
        member = _image_member(archive, path)
        if member.info.compress_type != zipfile.ZIP_STORED or member.fortran:
            return load_samples(path, num_classes)
        labels = _labels(archive, path)
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

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(path)
        with open_zip(self.path) as archive:
            member = _image_member(archive, self.path)
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
        with open_zip(self.path) as archive:
            member = _image_member(archive, self.path)
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
        fortran = _image_member(archive, path).fortran
    return ArraySource(load_samples(path)[0], str(path)) if fortran else NpzSource(path)


_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_PALETTE_MODES = ("P", "PA")


def _load_png_folder(path: Path, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
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
    if not isinstance(record, dict) or record.get("format") != _MARKER_RECORD["format"]:
        return (f"{folder}: its {SAMPLES_MARKER} marker is not cmboost's, so the folder is kept; delete it "
                f"yourself to replace it, or choose another --out")
    with os.scandir(folder) as entries:
        for entry in entries:
            ours = entry.name in (SAMPLES_MARKER, "labels.txt") or _PNG_NAME.fullmatch(entry.name)
            if not (ours and entry.is_file(follow_symlinks=False)):
                return (f"{folder}: holds {entry.name}, which cmboost did not write, so the folder is kept; "
                        f"move that out, or choose another --out")
    return None


def _not_replaceable(path: Path, kind: str) -> str | None:
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


def check_sample_output(path: str | os.PathLike, overwrite: bool, flag: str = "--out", resuming: bool = False) -> None:
    """Every check on a sample output, before any work and changing nothing: the path is not empty, the
    current folder or one above it; its suffix is .npz (a file) or none (a folder of PNGs); an existing
    output is replaced only with `overwrite` (or when `resuming` a job that wrote it), and only by its
    own kind, a folder only when cmboost wrote it; the folder above can be written."""
    refuse_unsafe_output(path, flag)
    path = Path(path)
    kind = _sample_output_kind(path, flag)
    if path.exists() or path.is_symlink():
        reason = _not_replaceable(path, kind)
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
    return _save_png_folder(path, images, labels, overwrite)


def write_npz(fh, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with a fixed timestamp in the zip entries, so equal arrays give byte-identical files."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _save_png_folder(path: Path, images: np.ndarray, labels: np.ndarray | None, overwrite: bool) -> Path:
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        width = max(6, len(str(len(images))))
        for i, image in enumerate(images):
            array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            Image.fromarray(array).save(tmp / f"{i:0{width}d}.png")
        if labels is not None:
            (tmp / "labels.txt").write_text("".join(f"{int(v)}\n" for v in labels))
        (tmp / SAMPLES_MARKER).write_text(json.dumps(_MARKER_RECORD) + "\n")
        old = None
        if path.exists() or path.is_symlink():
            # Checked again now: the folder may have changed during a long job since the first check.
            reason = _not_replaceable(path, "png")
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


def convert_samples(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False):
    """Rewrites a sample file as another layout (.npz <-> PNG folder); returns (images, labels)."""
    check_sample_output(out, overwrite)
    refuse_output_inside_inputs(out, [("the input", source)])
    images, labels = load_samples(source)
    save_samples(out, images, labels, overwrite=overwrite)
    return images, labels
