"""`cmboost train-features`: train a domain feature network (for FID/IS/PR on small datasets)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from cmboost.cli.common import add_output_flags
from cmboost.errors import UserInputError


def run(args: argparse.Namespace) -> int:
    import torch

    from cmboost.data import load_dataset

    from cmboost.atomic import refuse_existing
    from cmboost.metrics.domain_net import (TrainSettings, classify_accuracy, config_for_data, save_domain_net,
                                            train_domain_net)
    from cmboost.runtime import resolve_device, resolve_precision

    refuse_existing(args.out, args.overwrite)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserInputError(f"{flag} {value}: must be at least 1")
    if args.lr <= 0:
        raise UserInputError(f"--lr {args.lr}: must be positive")
    if args.limit < 0:
        raise UserInputError(f"--limit {args.limit}: must be 0 (all) or positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    images, labels, num_classes = load_dataset(args.data, "train", args.data_dir)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    config = config_for_data(images, num_classes, args.data, arch=args.arch)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             hflip=not args.no_flip)
    state = Path(str(args.out) + ".partial")
    print(f"training a domain feature net ({config.arch}, seed {settings.seed}) on {args.data} train "
          f"({len(images)} images, {config.in_channels}x{config.image_size}x{config.image_size}) on {device}, "
          f"{precision}")
    net = train_domain_net(images, labels, config, settings, device, precision, state_path=state)
    info = {"command": _command(args), "arch": config.arch, "seed": str(settings.seed),
            "data": args.data, "split": "train", "num_train": str(len(images)), "settings": settings.to_json(),
            "torch": torch.__version__}
    test_split = "test" if args.data.partition(":")[0] in ("fmnist", "fashion-mnist") else "val"
    try:
        test_images, test_labels, _ = load_dataset(args.data, test_split, args.data_dir)
    except Exception as err:  # a folder dataset has no held-out split
        print(f"no {test_split} split to measure accuracy on ({err})")
    else:
        accuracy = classify_accuracy(net, test_images, test_labels, device=device)
        info.update(test_split=test_split, test_accuracy=f"{accuracy:.4f}")
        print(f"{test_split} accuracy: {accuracy:.4f} ({len(test_images)} images)")
    save_domain_net(args.out, net, info, overwrite=args.overwrite)
    state.unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed flags (not sys.argv, which is
    the test runner's when called in-process)."""
    words = ["cmboost", "train-features", "--data", args.data, "--out", str(args.out), "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size), "--lr", repr(args.lr), "--seed", str(args.seed),
             "--arch", args.arch]
    if args.data_dir:
        words += ["--data-dir", str(args.data_dir)]
    if args.no_flip:
        words.append("--no-flip")
    if args.limit:
        words += ["--limit", str(args.limit)]
    if args.threads:
        words += ["--threads", str(args.threads)]
    words += ["--device", args.device, "--precision", args.precision]
    return " ".join(shlex.quote(w) for w in words)


def add_parser(verbs) -> None:
    from cmboost.metrics.domain_net import ARCHS, DEFAULT_SEED, TrainSettings

    defaults = TrainSettings()
    p = verbs.add_parser("train-features",
                         help="train a domain feature network (FID/IS/PR features for small datasets) on a "
                              "dataset's train split",
                         description="Trains a plain CNN, VGG-style or all-convolutional (not the joint network's "
                                     "ResNet, no adversarial training, its own seed) on the train split; reruns "
                                     "resume per epoch.")
    p.add_argument("--data", required=True, help="fmnist, imagenet64:PATH or folder:PATH (train split used)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files (default: system copy)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (cosine schedule)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"initial weights, data order, augmentation and dropout (default: {DEFAULT_SEED})")
    p.add_argument("--arch", default="vgg", choices=list(ARCHS),
                   help="vgg: 3x3 conv + BatchNorm + ReLU with max pooling (the shipped 'fmnist' net); allconv: "
                        "all-convolutional, strided convs, GELU, global average pool ('fmnist-allconv')")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips (for digits, text)")
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (quick runs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    add_output_flags(p)
    p.set_defaults(run=run)
