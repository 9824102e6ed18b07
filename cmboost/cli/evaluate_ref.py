"""`cmboost evaluate-ref`: the reference statistics of a dataset, as cmboost's .npz (one network,
with images and features for precision/recall) or an EDM2-style .pkl (mu/sigma per network)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return run_reference(args)


def run_reference(args: argparse.Namespace) -> int:
    from cmboost.cli.common import extractors
    from cmboost.atomic import refuse_existing
    from cmboost.data import load_dataset
    from cmboost.metrics.evaluate import extract_features
    from cmboost.samples import ArraySource
    from cmboost.metrics.ref_pickle import save_pickled_references
    from cmboost.metrics.reference import reference_stats, save_reference
    from cmboost.runtime import dist_info

    if args.data is None or args.out is None:
        raise UserInputError("'cmboost evaluate-ref' needs --data SPEC and --out REF.npz or REF.pkl")
    kind = Path(args.out).suffix.lower()
    if kind not in (".npz", ".pkl"):
        raise UserInputError(f"--out {args.out}: must end in .npz (cmboost/OpenAI layout) or .pkl (EDM2 layout)")
    if kind == ".npz" and "," in args.features:
        raise UserInputError(f"--out {args.out}: an .npz reference holds one feature network, --features lists "
                             "several; write a .pkl, or one .npz per network")
    if args.num_features < 4:
        raise UserInputError(f"--num-features {args.num_features}: need at least 4 for k=3 precision/recall")
    refuse_existing(args.out, args.overwrite)
    images, _, _ = load_dataset(args.data, args.split, args.data_dir)
    nets = extractors(args)
    source = f"{args.data} {args.split}"
    if kind == ".npz":
        ref = reference_stats(images, nets[0], args.batch_size, args.num_features, args.seed, source=source,
                              progress=not args.quiet)
        if dist_info().is_main:
            save_reference(args.out, ref, overwrite=args.overwrite)
            print(json.dumps({"out": str(args.out), "feature_net": ref.net, "count": ref.count,
                              "features_kept": int(len(ref.features)), "spatial": ref.mu_s is not None}))
        return 0
    stats = []
    for net in nets:
        net.check_images(images.shape[1:], source)
        feats = extract_features(ArraySource(images, source), net, args.batch_size, keep=np.empty(0, dtype=np.int64),
                                 keep_probs=False, progress=not args.quiet, desc=f"reference ({net.name})")
        stats.append((net.name, net.identity, feats.mu, feats.sigma))
    if dist_info().is_main:
        save_pickled_references(args.out, stats, len(images), overwrite=args.overwrite)
        print(json.dumps({"out": str(args.out), "feature_nets": [s[1] for s in stats], "count": len(images)}))
    return 0


def add_parser(verbs) -> None:
    from cmboost.cli.common import add_feature_flags

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
    p.add_argument("--data", required=True, help="fmnist, imagenet64:PATH or folder:PATH")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files")
    p.add_argument("--num-features", type=int, default=10000,
                   help=".npz: images whose features are kept for precision/recall (seeded choice; default 10000)")
    p.add_argument("--out", required=True, help="output .npz or .pkl")
    add_feature_flags(p)
    p.set_defaults(run=run)
