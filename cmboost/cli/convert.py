"""`cmboost convert` (sample files between .npz and PNG folders) and `cmboost export-data`
(a slice of a real dataset as a sample file, e.g. held-out images for calibration)."""

from __future__ import annotations

import argparse

from cmboost.cli.common import add_output_flags


def run_convert(args: argparse.Namespace) -> int:
    from cmboost.samples import check_sample_output, load_samples, save_samples

    check_sample_output(args.out, args.overwrite)
    images, labels = load_samples(args.samples)
    save_samples(args.out, images, labels, overwrite=args.overwrite)
    n_labels = "no labels" if labels is None else f"labels {labels.min()}..{labels.max()}"
    print(f"{args.out}: {len(images)} images {tuple(images.shape[1:])} (CHW), {n_labels}")
    return 0


def export_data(spec: str, split: str, out: str, start: int = 0, stop: int | None = None,
                image_size: int | None = None, data_dir: str | None = None, overwrite: bool = False):
    """Writes images [start, stop) of a dataset split as an OpenAI-layout sample file."""
    from cmboost.data import load_dataset, pad_to
    from cmboost.samples import check_sample_output, save_samples
    from cmboost.errors import UserInputError

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
