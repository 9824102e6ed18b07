"""`cmboost convert` (sample files between .npz and PNG folders) and `cmboost export-data`
(a slice of a real dataset as a sample file, e.g. held-out images for calibration)."""

from __future__ import annotations

import argparse

from cmboost.cli.common import add_output_flags
from cmboost.files.datasets import export_data
from cmboost.files.samples import convert_samples


def run_convert(args: argparse.Namespace) -> int:
    images, labels = convert_samples(args.samples, args.out, args.overwrite)
    n_labels = "no labels" if labels is None else f"labels {labels.min()}..{labels.max()}"
    print(f"{args.out}: {len(images)} images {tuple(images.shape[1:])} (CHW), {n_labels}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    path = export_data(args.data, args.split, args.out, args.start, args.stop, args.image_size, args.data_dir,
                       args.overwrite)
    print(f"wrote {path}")
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser("convert", help="convert samples between .npz (OpenAI layout) and a folder of PNGs")
    p.add_argument("samples", help="input .npz or PNG folder")
    add_output_flags(p)
    p.set_defaults(run=run_convert)

    p = verbs.add_parser("export-data", help="write a slice of a real dataset as a sample file (.npz or PNGs)")
    p.add_argument("--data", default="fmnist", help="fmnist, imagenet64:PATH or folder:PATH")
    p.add_argument("--split", default="train", choices=["train", "test", "val"])
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="pad Fashion-MNIST to this size (32 for the CMs)")
    p.add_argument("--data-dir", default=None)
    add_output_flags(p)
    p.set_defaults(run=run_export)
