"""The .npz archive read without loading it whole: each .npy member's header, memory-mapped or read member
by member, and written uncompressed."""

from __future__ import annotations

import dataclasses
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.sample_checks import integer_labels


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


def image_member(archive: zipfile.ZipFile, path: Path) -> NpyMember:
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


def labels_member(archive: zipfile.ZipFile, path: Path) -> np.ndarray | None:
    member = npy_member(archive, path, "arr_1")
    return None if member is None else integer_labels(read_member(archive, path, member), path)


def write_npz(fh, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with a fixed timestamp in the zip entries, so equal arrays give byte-identical files."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
