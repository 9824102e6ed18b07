"""`cmboost evaluate-ref`: the reference statistics of a dataset, as cmboost's .npz (one network,
with images and features for precision/recall) or an EDM2-style .pkl (mu/sigma per network)."""

from __future__ import annotations

import argparse
import json

from cmboost.cli.common import check_feature_flags
from cmboost.errors import UserInputError
from cmboost.records import param_default
from cmboost.cli.common import add_feature_flags, extractors
from cmboost.metrics.reference import check_reference_request, make_reference_file, reference_stats


def run(args: argparse.Namespace) -> int:
    check_feature_flags(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return run_reference(args)


def run_reference(args: argparse.Namespace) -> int:

    if args.data is None or args.out is None:
        raise UserInputError("'cmboost evaluate-ref' needs --data SPEC and --out REF.npz or REF.pkl")
    check_reference_request(args.out, len(args.features.split(",")), args.num_features)  # before any network loads
    summary = make_reference_file(args.data, args.split, args.out, extractors(args), args.data_dir, args.batch_size,
                                  args.num_features, args.seed, args.overwrite, progress=not args.quiet)
    if summary is not None:
        print(json.dumps(summary))
    return 0


def add_reference_flags(p: argparse.ArgumentParser, hidden: bool) -> None:
    """--data, --split, --data-dir, --num-features and --out; `hidden` for the old spelling
    'cmboost evaluate ref ...', whose parser reads them but documents none."""

    def text(help: str):
        return argparse.SUPPRESS if hidden else help

    p.add_argument("--data", required=not hidden, help=text("fmnist, imagenet64:PATH or folder:PATH"))
    p.add_argument("--split", default="test", help=text("dataset split (default: %(default)s)"))
    p.add_argument("--data-dir", default=None, help=text("folder of the Fashion-MNIST files"))
    p.add_argument("--num-features", type=int, default=param_default(reference_stats, "num_features"),
                   help=text(".npz: images whose features are kept for precision/recall, a seeded choice "
                             "(default: %(default)s)"))
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
