"""`cmboost evaluate-ref`: the reference statistics of a dataset, as cmboost's .npz (one network,
with images and features for precision/recall) or an EDM2-style .pkl (mu/sigma per network)."""

from __future__ import annotations

import argparse
import json

from cmboost.cli.common import add_feature_flags, add_field_flag, record_from_args
from cmboost.errors import UserInputError
from cmboost.metrics.evaluate_ref import ReferenceRun, make_reference


def record_from(args: argparse.Namespace) -> ReferenceRun:
    if args.data is None or args.out is None:
        raise UserInputError("'cmboost evaluate-ref' needs --data SPEC and --out REF.npz or REF.pkl")
    return record_from_args(ReferenceRun, args, {"progress": not args.quiet})


def run(args: argparse.Namespace) -> int:
    summary = make_reference(record_from(args))
    if summary is not None:
        print(json.dumps(summary))
    return 0


def add_reference_flags(p: argparse.ArgumentParser, hidden: bool) -> None:
    """--data, --split, --data-dir, --num-features, --seed and --out; `hidden` for the old spelling
    'cmboost evaluate ref ...', whose parser reads them but documents none."""

    def text(help: str):
        return argparse.SUPPRESS if hidden else help

    p.add_argument("--data", required=not hidden, help=text("fmnist, imagenet64:PATH or folder:PATH"))
    for name, help in (("split", "dataset split"),
                       ("num_features", ".npz: images whose features are kept for precision/recall, a seeded "
                                        "choice"),
                       ("seed", "the seed of that choice")):
        add_field_flag(p, ReferenceRun, name, text(help), type=str if name == "split" else int)
    p.add_argument("--data-dir", default=None, help=text("folder of the Fashion-MNIST files"))
    p.add_argument("--out", required=not hidden, help=text("output .npz or .pkl"))


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "evaluate-ref", help="reference statistics of a dataset (.npz, or EDM2-style .pkl) for 'cmboost evaluate'",
        description="cmboost evaluate-ref --data SPEC --split test --features fmnist --out REF.npz\n"
                    "cmboost evaluate-ref --data imagenet64:PATH --split train --features inception,dinov2 "
                    "--out ref.pkl\n\n"
                    ".npz: one feature network; mu/sigma (and Inception's spatial mu_s/sigma_s) over all images, "
                    "plus the images and features of --num-features of them for precision/recall, density, "
                    "coverage and KID. .pkl: EDM2's layout, mu/sigma of each listed network over all images "
                    "(entries 'fid' for Inception, 'fd_dinov2' for DINOv2), readable by EDM2's "
                    "calculate_metrics.py; FID/FD only.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_flags(p, hidden=False)
    add_feature_flags(p)
    p.set_defaults(run=run)
