"""`cmboost boost`: refine a sample file with a joint classifier-discriminator."""

from __future__ import annotations

import argparse
import json

from cmboost.boosting.boost import DEFAULT_METHOD, BoostRun, boost, resolve_boost, unchanged_reason
from cmboost.boosting.config import (BIGROC_STEP_FACTOR, FLAGS, METHODS, PGD_SCORES, PGD_STEP_FACTOR, REALNESS_KINDS,
                                     BIGRoCBoost, PGDBoost, SGLDBoost)
from cmboost.cli.common import (BLOCK_HELP, PART_HELP, add_output_flags, add_runtime_flags, record_from_args,
                                set_record_defaults)
from cmboost.records import field_default
from cmboost.runtime import BLOCK_SIZE, print0


def hyper_from_args(args: argparse.Namespace) -> dict:
    """The hyperparameter flags given on the command line (each checked against the method later)."""

    hyper = {}
    for name in FLAGS:
        if name == "seed":  # --seed is the run's, for sgld
            continue
        value = getattr(args, "sgld_" + name if name in ("step", "noise") else
                        "realness" if name == "realness_kind" else name)
        if value is not None:
            hyper[name] = value
    return hyper


def record_from(args: argparse.Namespace):
    return record_from_args(BoostRun, args, {"hyper": hyper_from_args(args), "grid": not args.no_grid,
                                             "progress": True})


def run(args: argparse.Namespace) -> int:
    record = record_from(args)
    if args.dry_run:
        reason = unchanged_reason(record)
        if reason is not None:  # what boost would do: write the images unchanged
            print0(json.dumps({"method": "none", "settings": record.settings, "reason": reason}, indent=2))
            return 0
        print0(json.dumps(resolve_boost(record).describe(record), indent=2))
        return 0
    print0(f"wrote {boost(record)}")
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser("boost", help="refine generated samples with the joint classifier-discriminator",
                         description="Refine samples (.npz, OpenAI layout) with PGD (paper), SGLD (release) "
                                     "or BIGRoC (classifier-only baseline). Rerunning the same command resumes.")
    p.add_argument("samples", help="input .npz (arr_0 uint8 NHWC, arr_1 labels) or PNG folder")
    p.add_argument("--model", required=True, help="joint network checkpoint (safetensors, released .pt, robustness, torchvision)")
    p.add_argument("--arch", default=None, help="architecture for checkpoints that do not record it")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=f"boosting method (default: {DEFAULT_METHOD}, or the method chosen in --settings)")
    p.add_argument("--settings", default=None,
                   help="settings file from 'cmboost tune': its chosen method (or --method's) and tuned values; "
                        "flags given explicitly override them")
    p.add_argument("--allow-other-network", action="store_true",
                   default=field_default(BoostRun, "allow_other_network"),
                   help="use a --settings file tuned for another network than --model (refused otherwise; "
                        "the mismatch is printed)")
    pgd, sgld, bigroc = PGDBoost(), SGLDBoost(), BIGRoCBoost()  # defaults live in the records only
    p.add_argument("--steps", type=int, default=None,
                   help=f"number of refinement steps (default: pgd {pgd.steps}, sgld {sgld.steps}, bigroc {bigroc.steps})")
    p.add_argument("--eps", type=float, default=None,
                   help=f"L2 radius around the input (default: pgd, the radius a train-jcd network was "
                        f"adversarially trained at, recorded in it, else {pgd.eps}; bigroc {bigroc.eps})")
    p.add_argument("--step-size", type=float, default=None,
                   help=f"L2 step length (default: pgd {PGD_STEP_FACTOR:g}*eps/steps, bigroc {BIGROC_STEP_FACTOR:g}*eps/steps)")
    p.add_argument("--objective", default=None, choices=PGD_SCORES, help=f"pgd score (default: {pgd.objective})")
    p.add_argument("--realness", default=None, choices=REALNESS_KINDS,
                   help=f"pgd reading of D(x,y) (default: the one the network was trained with, else {pgd.realness_kind})")
    p.add_argument("--threshold", type=float, default=None,
                   help="pgd early stop once D(x,y) >= this (default: never stop early)")
    p.add_argument("--threshold-from", default=None,
                   help="pgd: set the threshold to the mean D(x,y) of held-out real images in this .npz")
    p.add_argument("--sgld-step", type=float, default=None, help=f"sgld: per-image gradient step a (default: {sgld.step})")
    p.add_argument("--sgld-noise", type=float, default=None, help=f"sgld: noise scale s (default: {sgld.noise})")
    p.add_argument("--labels", default=field_default(BoostRun, "labels"), choices=["file", "predicted"],
                   help="class labels from the sample file or the model's argmax (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU; first batch compiles)")
    p.add_argument("--no-grid", action="store_true", help="skip the before/after PNG grid")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    add_runtime_flags(p, PART_HELP)
    p.add_argument("--block-size", type=int, default=None,
                   help=f"{BLOCK_HELP} (default: the block 'cmboost tune' scored the --settings file with, so "
                        f"that boost writes the images tune scored; else {BLOCK_SIZE})")
    add_output_flags(p)
    set_record_defaults(p, BoostRun, ("seed", "batch_size", "device", "precision"))
    p.set_defaults(run=run)
