"""Datasets (Fashion-MNIST, ImageNet 64x64 npz, class folders) and generated-sample files.

Conventions: in memory, images are uint8 NCHW numpy arrays (or float NCHW tensors in [0, 1]
once converted); on disk, sample files follow OpenAI's .npz layout: `arr_0` uint8 NHWC and
`arr_1` integer labels. Every reader checks what it reads and raises `UserInputError` with the
file's name and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from cmboost.atomic import atomic_open, atomic_write_bytes
from cmboost.errors import OutputExistsError, UserInputError

# ----------------------------------------------------------------------------- Fashion-MNIST

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
# MD5 of the files as published at FMNIST_URL (Debian recompresses its copies, so those differ).
FMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_MAGIC_IMAGES = 0x00000803  # unsigned byte, 3 dimensions
IDX_MAGIC_LABELS = 0x00000801  # unsigned byte, 1 dimension


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Reads one gzipped idx file, checking its magic number and that its size matches its header."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise UserInputError(f"{path}: not a readable gzip file ({err or 'truncated'})") from None
    if len(raw) < 4:
        raise UserInputError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise UserInputError(f"{path}: wrong idx magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserInputError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise UserInputError(f"{path}: idx header says {dims} ({expected} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four idx .gz files: `data_dir`, $CMBOOST_FMNIST_DIR, or Debian's."""
    candidates = [Path(data_dir)] if data_dir else []
    if os.environ.get("CMBOOST_FMNIST_DIR"):
        candidates.append(Path(os.environ["CMBOOST_FMNIST_DIR"]))
    candidates.append(FMNIST_SYSTEM_DIR)
    for folder in candidates:
        if (folder / FMNIST_FILES["test"][1]).is_file():
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise UserInputError(
        f"Fashion-MNIST not found in {where}: run 'apt-get install dataset-fashion-mnist', "
        f"or 'cmboost download-fmnist DIR' and pass --data-dir DIR")


def fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train" or "test"): images uint8 [N, 28, 28], labels int64 [N] in 0..9."""
    if split not in FMNIST_FILES:
        raise UserInputError(f"split {split!r}: choose 'train' or 'test'")
    folder = find_fashion_mnist(data_dir)
    image_file, label_file, count = FMNIST_FILES[split]
    images = read_idx(folder / image_file, IDX_MAGIC_IMAGES)
    labels = read_idx(folder / label_file, IDX_MAGIC_LABELS).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise UserInputError(f"{folder / image_file}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise UserInputError(f"{folder / label_file}: {len(labels)} labels for {len(images)} images")
    if len(images) != count:
        raise UserInputError(f"{folder / image_file}: {len(images)} images, the {split} split has {count}")
    if labels.max(initial=0) >= len(FMNIST_CLASSES):
        raise UserInputError(f"{folder / label_file}: label {labels.max()} out of range 0..9")
    return images, labels


def download_fashion_mnist(dest: str | os.PathLike, base_url: str = FMNIST_URL,
                           md5: dict[str, str] | None = None, timeout: float = 60.0) -> Path:
    """Downloads the four files into `dest` (skipping those present), checking each MD5 before keeping it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    md5 = FMNIST_MD5 if md5 is None else md5
    for image_file, label_file, _ in FMNIST_FILES.values():
        for name in (image_file, label_file):
            target = dest / name
            if target.is_file():
                continue
            url = base_url.rstrip("/") + "/" + name
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    payload = response.read()
            except OSError as err:
                raise UserInputError(f"{url}: download failed ({err})") from None
            digest = hashlib.md5(payload).hexdigest()
            if name in md5 and digest != md5[name]:
                raise UserInputError(f"{url}: MD5 {digest} does not match the published {md5[name]}")
            atomic_write_bytes(target, payload)
    return dest


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads [N, H, W] or [N, C, H, W] images symmetrically to size x size (28 -> 32 for the CMs)."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise UserInputError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = [(0, 0)] * (images.ndim - 2) + [(top, size - h - top), (left, size - w - left)]
    return np.pad(images, pad)


# ----------------------------------------------------------------------------- ImageNet 64x64

def imagenet64(path: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Downsampled ImageNet 64x64 npz batches: a folder of `train_data_batch_*.npz` / `val_data.npz`,
    or one such file. `data` is (N, 12288) stored channel-planar; labels are one-based on disk.
    Returns uint8 NCHW [N, 3, 64, 64] and zero-based int64 labels."""
    path = Path(path)
    if path.is_dir():
        pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        files = sorted(path.glob(pattern), key=lambda p: (len(p.name), p.name))
        if not files:
            raise UserInputError(f"{path}: no {pattern} files")
    elif path.is_file():
        files = [path]
    else:
        raise UserInputError(f"{path}: no such file or folder")
    images, labels = [], []
    for file in files:
        with _open_npz(file) as archive:
            for key in ("data", "labels"):
                if key not in archive.files:
                    raise UserInputError(f"{file}: no '{key}' array (has {', '.join(archive.files) or 'none'})")
            data, lab = archive["data"], np.asarray(archive["labels"]).astype(np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 64 * 64:
            raise UserInputError(f"{file}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 12288)")
        if len(lab) != len(data):
            raise UserInputError(f"{file}: {len(lab)} labels for {len(data)} images")
        if len(lab) and (lab.min() < 1 or lab.max() > 1000):
            raise UserInputError(f"{file}: labels must be one-based 1..1000, found {lab.min()}..{lab.max()}")
        images.append(data.reshape(-1, 3, 64, 64))
        labels.append(lab - 1)
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------- class folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_folder(root: str | os.PathLike, image_size: int | None = None,
                 channels: int = 3) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A folder with one subfolder per class. Returns uint8 NCHW, int64 labels, and the class names
    (sorted subfolder names). Images are resized (bicubic) to `image_size` when given."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"{root}: not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserInputError(f"{root}: no class subfolders")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise UserInputError(f"channels {channels}: must be 1 or 3")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as im:
                    im = im.convert(mode)
                    if image_size is not None and im.size != (image_size, image_size):
                        im = im.resize((image_size, image_size), Image.BICUBIC)
                    array = np.asarray(im, dtype=np.uint8)
            except OSError as err:
                raise UserInputError(f"{file}: not a readable image ({err})") from None
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise UserInputError(f"{root}: no images in its class subfolders")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserInputError(f"{root}: images differ in size {sorted(shapes)[:3]}; pass an image size to resize")
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


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


# ----------------------------------------------------------------------------- sample files

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


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserInputError(f"{path}: not a readable .npz file ({err})") from None


def load_samples(path: str | os.PathLike, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads an OpenAI-format .npz (`arr_0` uint8 NHWC, optional `arr_1` labels) or a folder of PNGs
    (with an optional labels.txt). Returns uint8 NCHW and int64 labels (or None)."""
    path = Path(path)
    if path.is_dir():
        return _load_png_folder(path, num_classes)
    with _open_npz(path) as archive:
        if "arr_0" not in archive.files:
            raise UserInputError(f"{path}: no 'arr_0' array (has {', '.join(archive.files) or 'none'})")
        try:
            images = archive["arr_0"]
            labels = archive["arr_1"] if "arr_1" in archive.files else None
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise UserInputError(f"{path}: damaged array ({err})") from None
    if images.dtype != np.uint8:
        raise UserInputError(f"{path}: arr_0 must be uint8, got {images.dtype}")
    if images.ndim != 4:
        raise UserInputError(f"{path}: arr_0 must be NHWC with 4 dimensions, got shape {images.shape}")
    if images.shape[3] not in (1, 3):
        raise UserInputError(f"{path}: arr_0 must have 1 or 3 channels last (NHWC), got shape {images.shape}")
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    labels = _integer_labels(labels, path)
    check_samples(images, labels, str(path), num_classes)
    return images, labels


def _integer_labels(labels: np.ndarray | None, path: Path) -> np.ndarray | None:
    """`arr_1` as int64, or a clear error when it holds anything but integers."""
    if labels is None:
        return None
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{path}: arr_1 labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def read_npy_header(fh, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `fh`, left positioned at the data."""
    try:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        return read_header(fh)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserInputError(f"{what}: damaged .npy header ({err})") from None


def open_zip(path: Path) -> zipfile.ZipFile:
    """An .npz opened as the zip it is, with one clear line when it is missing or not a zip."""
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise UserInputError(f"{path}: not a readable .npz file ({err})") from None


def map_samples(path: str | os.PathLike, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Like `load_samples`, but an uncompressed .npz's `arr_0` is memory-mapped (an NCHW view), so a
    50k-image file costs no memory until a batch is sliced. Other inputs are read whole."""
    path = Path(path)
    if path.is_dir():
        return load_samples(path, num_classes)
    with open_zip(path) as archive:
        member = next((i for i in archive.infolist() if i.filename == "arr_0.npy"), None)
        if member is None or member.compress_type != zipfile.ZIP_STORED:
            return load_samples(path, num_classes)
        with open(path, "rb") as fh:
            # The data sit after the local file header (30 bytes + name + extra) and the .npy header.
            fh.seek(member.header_offset)
            local = fh.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise UserInputError(f"{path}: damaged zip entry for arr_0")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            fh.seek(member.header_offset + 30 + name_len + extra_len)
            shape, fortran, dtype = read_npy_header(fh, f"{path}: arr_0")
            offset = fh.tell()
        labels = None
        if "arr_1.npy" in archive.namelist():
            with archive.open("arr_1.npy") as member_fh:
                try:
                    labels = np.lib.format.read_array(member_fh, allow_pickle=False)
                except (ValueError, OSError, EOFError) as err:
                    raise UserInputError(f"{path}: damaged arr_1 ({err})") from None
    if dtype != np.uint8:
        raise UserInputError(f"{path}: arr_0 must be uint8, got {dtype}")
    if len(shape) != 4 or shape[3] not in (1, 3) or fortran:
        raise UserInputError(f"{path}: arr_0 must be NHWC with 1 or 3 channels last, got shape {shape}")
    if offset + int(np.prod(shape)) > path.stat().st_size:
        raise UserInputError(f"{path}: arr_0 is truncated")
    images = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(shape)).transpose(0, 3, 1, 2)
    labels = _integer_labels(labels, path)
    check_samples(images, labels, str(path), num_classes)
    return images, labels


def _load_png_folder(path: Path, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise UserInputError(f"{path}: no .png files")
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                array = np.asarray(im)
        except OSError as err:
            raise UserInputError(f"{file}: not a readable PNG ({err})") from None
        if array.dtype != np.uint8:
            raise UserInputError(f"{file}: expected 8-bit pixels, got {array.dtype}")
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
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


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """Raises OutputExistsError unless `path` is free or `overwrite` was asked for."""
    if Path(path).exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")


def save_samples(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
                 overwrite: bool = False) -> Path:
    """Writes uint8 NCHW `images` (and labels) as an OpenAI .npz (path ends in .npz) or as a folder of
    PNGs with labels.txt (any other path). Atomic: a temp file in the same folder, then a rename."""
    path = Path(path)
    images = np.asarray(images)
    labels = None if labels is None else np.asarray(labels)
    check_samples(images, labels, str(path))
    refuse_existing(path, overwrite)
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
        if path.exists() and overwrite:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------- one entry point

def load_dataset(spec: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 image_size: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Real data named on the command line: "fmnist", "imagenet64:PATH" or "folder:PATH".
    Returns uint8 NCHW images, int64 labels and the number of classes. Fashion-MNIST is
    zero-padded to `image_size` when given (32 for the consistency models)."""
    kind, _, location = spec.partition(":")
    if kind in ("fmnist", "fashion-mnist"):
        images, labels = fashion_mnist(split, data_dir or (location or None))
        images = images[:, None]
        if image_size is not None and image_size != 28:
            images = pad_to(images, image_size)
        return images, labels, len(FMNIST_CLASSES)
    if kind == "imagenet64":
        if not location:
            raise UserInputError("--data imagenet64:PATH needs the folder of npz batches")
        images, labels = imagenet64(location, split)
        return images, labels, 1000
    if kind == "folder":
        if not location:
            raise UserInputError("--data folder:PATH needs a folder with one subfolder per class")
        images, labels, classes = image_folder(location, image_size)
        return images, labels, len(classes)
    raise UserInputError(f"--data {spec!r}: use fmnist, imagenet64:PATH or folder:PATH")


def iter_batches(images: np.ndarray, labels: np.ndarray | None, batch_size: int) -> Iterable[tuple]:
    """Consecutive (images, labels) batches of arrays."""
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        yield images[start:stop], None if labels is None else labels[start:stop]
