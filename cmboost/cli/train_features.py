"""`cmboost train-features`: train a domain feature network (for FID/IS/PR on small datasets)."""

from __future__ import annotations

import argparse
import functools

from cmboost.cli.common import add_device_flags, add_field_flag, add_output_flags, record_from_args, set_record_defaults
from cmboost.metrics.domain_net import ARCHS
from cmboost.metrics.domain_training import TrainSettings
from cmboost.metrics.train_features import FeatureTraining, train_features
from cmboost.records import field_default

# TrainSettings fields that no flag sets.
UNFLAGGED = ("weight_decay", "warmup_steps", "max_shift")


def record_from(args: argparse.Namespace):
    settings = record_from_args(TrainSettings, args, {}, keep_defaults=UNFLAGGED)
    return record_from_args(FeatureTraining, args, {"settings": settings})


def run(args: argparse.Namespace) -> int:
    train_features(record_from(args))
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser("train-features",
                         help="train a domain feature network (FID/IS/PR features for small datasets) on a "
                              "dataset's train split",
                         description="Trains a feature net (VGG-style, all-convolutional, a BatchNorm ResNet, a "
                                     "shallow GroupNorm CNN or an MLP-Mixer, its own seed) on the train split, "
                                     "plainly or adversarially (--adv-eps); reruns resume per epoch.")
    setting = functools.partial(add_field_flag, p, TrainSettings)
    p.add_argument("--data", required=True, help="fmnist, imagenet64:PATH or folder:PATH (train split used)")
    job = functools.partial(add_field_flag, p, FeatureTraining)
    job("data_dir", "folder of the Fashion-MNIST files (default: system copy)")
    setting("epochs", "passes over the train split", type=int)
    setting("batch_size", "images per step", type=int)
    setting("lr", "peak AdamW learning rate (cosine schedule)", type=float)
    setting("seed", "initial weights, data order, augmentation and dropout", type=int)
    p.add_argument("--arch", default=field_default(FeatureTraining, "arch"), choices=list(ARCHS),
                   help="vgg: 3x3 conv + BatchNorm + ReLU with max pooling (the shipped 'fmnist' net); allconv: "
                        "all-convolutional, strided convs, GELU, global average pool ('fmnist-allconv'); resnet: "
                        "basic residual blocks with BatchNorm and SiLU ('fmnist-resnet'); shallow: three wide 5x5/3x3 convs, "
                        "GroupNorm, ELU, average pooling ('fmnist-shallow'); mixer: an MLP-Mixer over 4x4 patches "
                        "('fmnist-mixer') (default: %(default)s)")
    setting("adv_eps", "L2 radius of adversarial training in [0, 1] pixels; 0: plain cross-entropy", type=float)
    setting("adv_steps", "PGD steps of the adversarial-training attack", type=int)
    p.add_argument("--no-flip", dest="hflip", action="store_false", default=field_default(TrainSettings, "hflip"),
                   help="no horizontal flips (for digits, text; default: random flips)")
    job("limit", "train on the first N images only; 0: all", type=int)
    job("threads", "torch CPU threads; 0: torch's choice", type=int)
    add_device_flags(p)
    add_output_flags(p)
    set_record_defaults(p, FeatureTraining, ("device", "precision"))
    p.set_defaults(run=run)
