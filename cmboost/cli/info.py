"""`cmboost info` and `cmboost download-fmnist`."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from cmboost import __version__
from cmboost.errors import UserInputError
from cmboost.files.datasets import download_fashion_mnist, fashion_mnist, find_fashion_mnist
from cmboost.runtime import resolve_device, resolve_precision


def weights_dirs() -> list[Path]:
    """Where feature-network weights are looked for, in order (metrics.features): $CMBOOST_WEIGHTS,
    then torch's hub cache; the shipped networks live in the package's assets."""
    import torch

    dirs = []
    if os.environ.get("CMBOOST_WEIGHTS"):
        dirs.append(Path(os.environ["CMBOOST_WEIGHTS"]))
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    dirs.append(Path(__file__).resolve().parent.parent / "assets")
    return dirs


def collect_info(data_dir: str | None = None) -> dict:
    """Versions, device, Fashion-MNIST location and counts, weight folders."""
    import numpy
    import torch
    import torchvision


    device = resolve_device(None)
    info = {
        "cmboost": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "device": str(device),
        "precision": resolve_precision(None, device),
        "cuda_devices": torch.cuda.device_count(),
        "weights_dirs": [str(d) for d in weights_dirs()],
    }
    try:
        folder = find_fashion_mnist(data_dir)
        info["fashion_mnist"] = str(folder)
        info["fashion_mnist_train"] = len(fashion_mnist("train", folder)[1])
        info["fashion_mnist_test"] = len(fashion_mnist("test", folder)[1])
    except UserInputError as err:
        info["fashion_mnist"] = f"not found: {err}"
    return info


def run_info(args: argparse.Namespace) -> int:
    if args.data_dir is not None and not Path(args.data_dir).is_dir():  # a typo is an error, not another copy
        raise UserInputError(f"--data-dir {args.data_dir}: no such folder")
    for key, value in collect_info(args.data_dir).items():
        print(f"{key:20s} {value}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    folder = download_fashion_mnist(args.dest, base_url=args.url)
    print(f"Fashion-MNIST in {folder}")
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser("info", help="versions, device, datasets and weight folders")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files")
    p.set_defaults(run=run_info)
    p = verbs.add_parser("download-fmnist", help="download Fashion-MNIST from its official location")
    p.add_argument("dest", help="folder to put the four idx .gz files in")
    p.add_argument("--url", default="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
    p.set_defaults(run=run_download)
