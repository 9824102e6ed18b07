"""Flags shared by several verbs, declared once so they read the same everywhere."""

from __future__ import annotations

import argparse


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --precision."""
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when present)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision (default: bf16 on GPU, fp32 on CPU)")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """--device, --precision, --seed and --batch-size."""
    add_device_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample i uses stream (seed, i)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")


def add_output_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--out and --overwrite."""
    parser.add_argument("--out", required=required, help="output file")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def add_feature_flags(p: argparse.ArgumentParser) -> None:
    """--features and the weights files, threads, progress and the runtime flags, shared with evaluate-ref."""
    p.add_argument("--features", default="fmnist",
                   help="feature network(s), comma-separated, the first one for FID/sFID/IS/PR/KID/density/"
                        "coverage: inception, dinov2, effnet-lite0, a shipped domain net (fmnist, fmnist-allconv), "
                        "or a domain-net .safetensors (default: fmnist)")
    p.add_argument("--inception-weights", default=None,
                   help="weights-inception-2015-12-05-6726825d.pth, or its folder (default: $CMBOOST_WEIGHTS, "
                        "then torch's hub cache, then a download)")
    p.add_argument("--dinov2-weights", default=None,
                   help="dinov2_vitl14_pretrain.pth, or its folder (default: $CMBOOST_WEIGHTS, then torch's "
                        "hub cache, then a download)")
    p.add_argument("--overwrite", action="store_true", help="replace the output (--out / --json) if it exists")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_runtime_flags(p)
    p.set_defaults(precision="fp32", batch_size=200)


def extractors(args) -> list:
    """The feature extractors of --features (comma-separated), on --device, set up for torchrun."""
    from cmboost.metrics.feature_nets import extractors_for
    from cmboost.runtime import init_distributed, resolve_device

    device = resolve_device(args.device)
    init_distributed(device)
    return extractors_for(args.features, device, args.precision, args.inception_weights, args.dinov2_weights)
