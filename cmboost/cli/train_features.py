"""`cmboost train-features`: train a domain feature network (for FID/IS/PR on small datasets)."""

from __future__ import annotations

import argparse
import functools
import shlex
from pathlib import Path

from cmboost.cli.common import add_device_flags, add_field_flag, add_output_flags, record_from_args
from cmboost.errors import UserInputError
from cmboost.records import field_default

# TrainSettings fields that no flag sets.
UNFLAGGED = ("weight_decay", "warmup_steps", "max_shift")


def run(args: argparse.Namespace) -> int:
    import torch

    from cmboost.data import load_dataset

    from cmboost.atomic import refuse_existing
    from cmboost.metrics.domain_net import (TrainSettings, classify_accuracy, config_for_data, save_domain_net,
                                            train_domain_net)
    from cmboost.runtime import resolve_device, resolve_precision

    settings = record_from_args(TrainSettings, args, {}, keep_defaults=UNFLAGGED)
    for flag, value in (("--limit", args.limit), ("--threads", args.threads)):
        if value < 0:
            raise UserInputError(f"{flag} {value}: must be >= 0")
    refuse_existing(args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    images, labels, num_classes = load_dataset(args.data, "train", args.data_dir)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    config = config_for_data(images, num_classes, args.data, arch=args.arch)
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
    if args.adv_eps:
        words += ["--adv-eps", repr(args.adv_eps), "--adv-steps", str(args.adv_steps)]
    if args.data_dir:
        words += ["--data-dir", str(args.data_dir)]
    if not args.hflip:
        words.append("--no-flip")
    if args.limit:
        words += ["--limit", str(args.limit)]
    if args.threads:
        words += ["--threads", str(args.threads)]
    words += ["--device", args.device, "--precision", args.precision]
    return " ".join(shlex.quote(w) for w in words)


def add_parser(verbs) -> None:
    from cmboost.metrics.domain_net import ARCHS, DomainNetConfig, TrainSettings

    p = verbs.add_parser("train-features",
                         help="train a domain feature network (FID/IS/PR features for small datasets) on a "
                              "dataset's train split",
                         description="Trains a feature net (VGG-style, all-convolutional, a BatchNorm ResNet, a "
                                     "shallow GroupNorm CNN or an MLP-Mixer, its own seed) on the train split, "
                                     "plainly or adversarially (--adv-eps); reruns resume per epoch.")
    setting = functools.partial(add_field_flag, p, TrainSettings)
    p.add_argument("--data", required=True, help="fmnist, imagenet64:PATH or folder:PATH (train split used)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files (default: system copy)")
    setting("epochs", "passes over the train split", type=int)
    setting("batch_size", "images per step", type=int)
    setting("lr", "peak AdamW learning rate (cosine schedule)", type=float)
    setting("seed", "initial weights, data order, augmentation and dropout", type=int)
    p.add_argument("--arch", default=field_default(DomainNetConfig, "arch"), choices=list(ARCHS),
                   help="vgg: 3x3 conv + BatchNorm + ReLU with max pooling (the shipped 'fmnist' net); allconv: "
                        "all-convolutional, strided convs, GELU, global average pool ('fmnist-allconv'); resnet: "
                        "basic residual blocks with BatchNorm and SiLU ('fmnist-resnet'); shallow: three wide 5x5/3x3 convs, "
                        "GroupNorm, ELU, average pooling ('fmnist-shallow'); mixer: an MLP-Mixer over 4x4 patches "
                        "('fmnist-mixer') (default: %(default)s)")
    setting("adv_eps", "L2 radius of adversarial training in [0, 1] pixels; 0: plain cross-entropy", type=float)
    setting("adv_steps", "PGD steps of the adversarial-training attack", type=int)
    p.add_argument("--no-flip", dest="hflip", action="store_false", default=field_default(TrainSettings, "hflip"),
                   help="no horizontal flips (for digits, text; default: random flips)")
    p.add_argument("--limit", type=int, default=0,
                   help="train on the first N images only; 0: all (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's choice (default: %(default)s)")
    add_device_flags(p)
    add_output_flags(p)
    p.set_defaults(run=run)
