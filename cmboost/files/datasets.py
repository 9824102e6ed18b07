"""Real datasets: Fashion-MNIST (Debian package or download), ImageNet 64x64 npz batches, class folders.

Every loader returns uint8 NCHW images and int64 labels, checks what it reads, and raises
`UserInputError` with the file's name and the problem. Generated-sample files live in files/samples.py.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_write_bytes
from cmboost.files.npz import npy_member, open_zip, read_member
from cmboost.files.samples import check_sample_output, save_samples
from cmboost.runtime import check_allocatable

# ----------------------------------------------------------------------------- Fashion-MNIST

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
# Fashion-MNIST train[55000:] is held out: no joint network trains on it; it calibrates early stops
# and gives the demo its real-image bars (recipes/fmnist.sh reads this value).
FMNIST_HELD_OUT_START = 55000
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


def find_fashion_mnist(data_dir: str | os.PathLike | None = None, flag: str = "--data-dir") -> Path:
    """The folder holding the four idx .gz files: `data_dir` when given (only it: a folder that is
    missing or lacks the files is an error naming `flag`, never a silent fall-back to another copy),
    else $CMBOOST_FMNIST_DIR, else Debian's."""
    if data_dir is not None:
        if str(data_dir) == "":
            raise UserInputError(f"{flag} is empty; give the folder of the Fashion-MNIST files, or leave the "
                                 f"flag out for the system copy")
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UserInputError(f"{flag} {data_dir}: {'is a file, not' if folder.exists() else 'no such'} folder "
                                 f"(it should hold the Fashion-MNIST idx .gz files; 'cmboost download-fmnist "
                                 f"{data_dir}' fetches them)")
        names = [name for files in FMNIST_FILES.values() for name in files[:2]]
        if not any((folder / name).is_file() for name in names):
            raise UserInputError(f"{flag} {data_dir}: holds none of the Fashion-MNIST files ({', '.join(names)}); "
                                 f"'cmboost download-fmnist {data_dir}' fetches them")
        return folder
    candidates = []
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


def fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None,
                  flag: str = "--data-dir") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train" or "test"): images uint8 [N, 28, 28], labels int64 [N] in 0..9."""
    if split not in FMNIST_FILES:
        raise UserInputError(f"split {split!r}: choose 'train' or 'test'")
    folder = find_fashion_mnist(data_dir, flag)
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
        raise UserInputError(f"--image-size {size}: cannot pad {h}x{w} images to {size}x{size}")
    per_image = int(np.prod(images.shape[1:-2], dtype=np.int64)) * size * size
    check_allocatable(len(images) * per_image, f"--image-size {size}: {len(images)} images of {size}x{size}")
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
        arrays = {}
        with open_zip(file) as archive:
            for key in ("data", "labels"):
                member = npy_member(archive, file, key)
                if member is None:
                    names = ", ".join(n.removesuffix(".npy") for n in archive.namelist())
                    raise UserInputError(f"{file}: no '{key}' array (has {names or 'none'})")
                arrays[key] = read_member(archive, file, member)
        data, lab = arrays["data"], arrays["labels"].astype(np.int64)
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
    files = [(label, file) for label, name in enumerate(classes) for file in sorted((root / name).iterdir())
             if file.suffix.lower() in IMAGE_SUFFIXES]
    if image_size is not None:
        if image_size < 1:
            raise UserInputError(f"--image-size {image_size}: must be >= 1")
        check_allocatable(len(files) * channels * image_size ** 2,
                          f"--image-size {image_size}: {len(files)} images of {image_size}x{image_size}")
    images, labels = [], []
    for label, file in files:
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


# ----------------------------------------------------------------------------- one entry point

def evaluation_split(spec: str) -> str | None:
    """The labelled split a dataset named on the command line keeps apart from training: Fashion-MNIST's
    test split, ImageNet's validation split; None for a class folder, which has only one."""
    kind = spec.partition(":")[0]
    return {"fmnist": "test", "fashion-mnist": "test", "imagenet64": "val"}.get(kind)


def load_dataset(spec: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 image_size: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Real data named on the command line: "fmnist", "imagenet64:PATH" or "folder:PATH".
    Returns uint8 NCHW images, int64 labels and the number of classes. Fashion-MNIST is
    zero-padded to `image_size` when given (32 for the consistency models)."""
    kind, _, location = spec.partition(":")
    if kind in ("fmnist", "fashion-mnist"):
        if data_dir is not None:
            images, labels = fashion_mnist(split, data_dir)
        else:
            images, labels = fashion_mnist(split, location or None, f"--data {spec}")
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


def export_data(spec: str, split: str, out: str, start: int = 0, stop: int | None = None,
                image_size: int | None = None, data_dir: str | None = None, overwrite: bool = False):
    """Writes images [start, stop) of a dataset split as an OpenAI-layout sample file."""

    check_sample_output(out, overwrite)
    # Fashion-MNIST is padded after slicing: only the images written are padded (and counted against memory).
    pad_after = spec.partition(":")[0] in ("fmnist", "fashion-mnist") and image_size is not None
    images, labels, _ = load_dataset(spec, split, data_dir, None if pad_after else image_size)
    stop = len(images) if stop is None else stop
    if not 0 <= start < stop <= len(images):
        raise UserInputError(f"--start {start} --stop {stop}: outside the {len(images)} images of {spec} {split}")
    images, labels = images[start:stop], labels[start:stop]
    if pad_after and image_size != images.shape[-1]:
        images = pad_to(images, image_size)
    return save_samples(out, images, labels, overwrite=overwrite)
