"""`cmboost convert`: sample files between .npz and PNG folders (and a check of either)."""

from __future__ import annotations

import argparse

from cmboost.cli.common import add_output_flags


def run(args: argparse.Namespace) -> int:
    from cmboost.data import load_samples, refuse_existing, save_samples

    refuse_existing(args.out, args.overwrite)
    images, labels = load_samples(args.samples)
    save_samples(args.out, images, labels, overwrite=args.overwrite)
    n_labels = "no labels" if labels is None else f"labels {labels.min()}..{labels.max()}"
    print(f"{args.out}: {len(images)} images {tuple(images.shape[1:])} (CHW), {n_labels}")
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser("convert", help="convert samples between .npz (OpenAI layout) and a folder of PNGs")
    p.add_argument("samples", help="input .npz or PNG folder")
    add_output_flags(p)
    p.set_defaults(run=run)
