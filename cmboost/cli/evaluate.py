"""`cmboost evaluate`: FID, sFID, IS, precision and recall of samples against a reference;
`cmboost evaluate ref`: compute and save a reference for a dataset."""

from __future__ import annotations

import argparse
import json

from cmboost.cli.common import add_runtime_flags
from cmboost.errors import UserInputError


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.samples == "ref":
        return run_reference(args)
    return run_samples(args)


def _extractor(args):
    from cmboost.metrics.features import load_feature_extractor
    from cmboost.runtime import init_distributed, resolve_device

    device = resolve_device(args.device)
    init_distributed(device)
    return load_feature_extractor(args.features, device, args.precision, args.inception_weights)


def run_samples(args: argparse.Namespace) -> int:
    from cmboost.atomic import refuse_existing
    from cmboost.metrics.evaluate import evaluate_source, format_table, open_samples, write_json
    from cmboost.metrics.reference import load_reference
    from cmboost.runtime import dist_info

    if args.ref is None:
        raise UserInputError("--ref REF.npz is required (make one with 'cmboost evaluate ref')")
    if args.out is not None:
        raise UserInputError("--out is for 'cmboost evaluate ref'; write results with --json PATH")
    if args.json:
        refuse_existing(args.json, args.overwrite)
    source = open_samples(args.samples)
    reference = load_reference(args.ref)
    extractor = _extractor(args)
    result = evaluate_source(source, reference, extractor, args.batch_size, progress=not args.quiet)
    if dist_info().is_main:
        print(format_table(result))
        if args.json:
            write_json(args.json, result, overwrite=args.overwrite)
            print(f"wrote {args.json}")
    return 0


def run_reference(args: argparse.Namespace) -> int:
    from cmboost.data import load_dataset
    from cmboost.atomic import refuse_existing
    from cmboost.metrics.reference import reference_stats, save_reference
    from cmboost.runtime import dist_info

    if args.data is None or args.out is None:
        raise UserInputError("'cmboost evaluate ref' needs --data SPEC and --out REF.npz")
    if args.num_features < 4:
        raise UserInputError(f"--num-features {args.num_features}: need at least 4 for k=3 precision/recall")
    refuse_existing(args.out, args.overwrite)
    images, _, _ = load_dataset(args.data, args.split, args.data_dir)
    extractor = _extractor(args)
    ref = reference_stats(images, extractor, args.batch_size, args.num_features, args.seed,
                          source=f"{args.data} {args.split}", progress=not args.quiet)
    if dist_info().is_main:
        save_reference(args.out, ref, overwrite=args.overwrite)
        print(json.dumps({"out": str(args.out), "feature_net": ref.net, "count": ref.count,
                          "features_kept": int(len(ref.features)), "spatial": ref.mu_s is not None}))
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "evaluate", help="FID, sFID, IS, precision/recall of samples; 'evaluate ref' makes a reference",
        description="cmboost evaluate SAMPLES --ref REF.npz [--features inception|fmnist|PATH] [--json OUT]\n"
                    "cmboost evaluate ref --data SPEC --split test --features fmnist --out REF.npz\n\n"
                    "The guided-diffusion protocol: FID on pool features, sFID on Inception's mixed_6/conv "
                    "(n/a for nets without spatial features), IS over splits of 5000, k=3 precision/recall. "
                    "Features are computed in fp32 unless --precision says otherwise. Under torchrun the "
                    "feature extraction is sharded across ranks.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="samples .npz (OpenAI layout) or PNG folder; or the word 'ref'")
    p.add_argument("--ref", help="reference .npz (OpenAI's, or one from 'cmboost evaluate ref')")
    p.add_argument("--features", default="fmnist",
                   help="inception, effnet-lite0, a shipped domain net (fmnist, fmnist-allconv), or a domain-net .safetensors (default: fmnist)")
    p.add_argument("--inception-weights", default=None,
                   help="weights-inception-2015-12-05-6726825d.pth, or its folder (default: $CMBOOST_WEIGHTS, "
                        "then torch's hub cache, then a download)")
    p.add_argument("--json", default=None, help="also write the results here (JSON)")
    p.add_argument("--data", default=None, help="ref: fmnist, imagenet64:PATH or folder:PATH")
    p.add_argument("--split", default="test", help="ref: dataset split (default: test)")
    p.add_argument("--data-dir", default=None, help="ref: folder of the Fashion-MNIST files")
    p.add_argument("--num-features", type=int, default=10000,
                   help="ref: images whose features are kept for precision/recall (seeded choice; default 10000)")
    p.add_argument("--out", default=None, help="ref: output .npz")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --json if it exists")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_flags(p)
    p.set_defaults(run=run, precision="fp32", batch_size=200)
