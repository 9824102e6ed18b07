"""`cmboost boost`: refine a sample file with a joint classifier-discriminator."""

from __future__ import annotations

import argparse
import dataclasses
import json

from cmboost.cli.common import BLOCK_HELP, PART_HELP, add_output_flags, add_runtime_flags, check_seed_flag

DEFAULT_METHOD = "pgd"  # the paper's; --settings from 'cmboost tune' may choose another


def hyper_from_args(args: argparse.Namespace) -> dict:
    """The hyperparameter flags given on the command line; one given for a method that lacks it is an error."""
    from cmboost.boost_config import FLAGS, METHODS
    from cmboost.errors import UserInputError

    fields = {f.name for f in dataclasses.fields(METHODS[args.method])}
    hyper = {}
    for name, flag in FLAGS.items():
        value = getattr(args, "sgld_" + name if name in ("step", "noise") else
                        "realness" if name == "realness_kind" else name)
        if value is None or name == "seed":
            continue
        if name not in fields:
            raise UserInputError(f"{flag} does not apply to --method {args.method}")
        hyper[name] = value
    if args.method == "sgld":
        hyper["seed"] = args.seed
    return hyper


def run(args: argparse.Namespace) -> int:
    from cmboost.boost_config import make_hyper
    from cmboost.boost_job import boost_file, resolve_threshold, trained_realness_kind, with_trained_radius
    from cmboost.errors import UserInputError
    from cmboost.jcd import load_joint_model
    from cmboost.jobs import refuse_finished
    from cmboost.runtime import print0, resolve_device, resolve_precision

    check_seed_flag(args)  # used by sgld only, refused alike for every method
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.block_size is not None and args.block_size < 1:
        raise UserInputError(f"--block-size {args.block_size}: must be at least 1")
    if args.settings:
        from cmboost.tune import load_settings_file, settings_block, tuned_hyper

        settings = load_settings_file(args.settings)
        args.method, tuned = tuned_hyper(settings, args.method, args.settings)
        if args.block_size is None:  # the block tune scored the settings with, so the images are the same
            args.block_size = settings_block(settings)
        if args.threshold_from or args.threshold is not None:
            tuned.pop("threshold", None)
        hyper = {**tuned, **hyper_from_args(args)}  # a flag given explicitly overrides the tuned value
    else:
        args.method = args.method or DEFAULT_METHOD
        hyper = hyper_from_args(args)
    if args.block_size is None:
        from cmboost.runtime import BLOCK_SIZE

        args.block_size = BLOCK_SIZE
    hyper = with_trained_radius(args.method, hyper, args.model)
    if args.threshold_from and args.method != "pgd":
        raise UserInputError(f"--threshold-from does not apply to --method {args.method}")
    record = make_hyper(args.method, **hyper)  # the one validated record: bad values fail before any loading
    refuse_finished(args.out, args.overwrite)  # before loading a network that may take seconds to read
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model = load_joint_model(args.model, arch=args.arch).to(device)
    if args.compile:
        import torch

        model.backbone = torch.compile(model.backbone)
    if args.method == "pgd":
        kind = record.realness_kind
        if "realness_kind" not in hyper:
            # A network trained by train-jcd records which reading of realness its objective trained.
            kind = trained_realness_kind(args.model) or kind
        threshold = resolve_threshold(model, record.threshold, args.threshold_from, kind, device, precision)
        record = dataclasses.replace(record, realness_kind=kind, threshold=threshold)
    resolved = {"samples": args.samples, "model": args.model, "out": args.out, "method": args.method,
                "hyper": dataclasses.asdict(record), "labels": args.labels,
                "device": str(device), "precision": precision, "batch_size": args.batch_size,
                "block_size": args.block_size, "compile": args.compile}
    if args.dry_run:
        print0(json.dumps(resolved, indent=2))
        return 0
    path = boost_file(args.samples, model, args.out, args.method, record, batch_size=args.batch_size,
                      device=str(device), precision=precision, label_source=args.labels,
                      overwrite=args.overwrite, grid=not args.no_grid, block_size=args.block_size)
    print0(f"wrote {path}")
    return 0


def add_parser(verbs) -> None:
    from cmboost.boost_config import (BIGROC_STEP_FACTOR, METHODS, OBJECTIVES, PGD_STEP_FACTOR, REALNESS_KINDS,
                                      BIGRoCBoost, PGDBoost, SGLDBoost)
    from cmboost.runtime import BLOCK_SIZE

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
    pgd, sgld, bigroc = PGDBoost(), SGLDBoost(), BIGRoCBoost()  # defaults live in the records only
    p.add_argument("--steps", type=int, default=None,
                   help=f"number of refinement steps (default: pgd {pgd.steps}, sgld {sgld.steps}, bigroc {bigroc.steps})")
    p.add_argument("--eps", type=float, default=None,
                   help=f"L2 radius around the input (default: pgd, the radius a train-jcd network was "
                        f"adversarially trained at, recorded in it, else {pgd.eps}; bigroc {bigroc.eps})")
    p.add_argument("--step-size", type=float, default=None,
                   help=f"L2 step length (default: pgd {PGD_STEP_FACTOR:g}*eps/steps, bigroc {BIGROC_STEP_FACTOR:g}*eps/steps)")
    p.add_argument("--objective", default=None, choices=OBJECTIVES, help=f"pgd score (default: {pgd.objective})")
    p.add_argument("--realness", default=None, choices=REALNESS_KINDS,
                   help=f"pgd reading of D(x,y) (default: the one the network was trained with, else {pgd.realness_kind})")
    p.add_argument("--threshold", type=float, default=None,
                   help="pgd early stop once D(x,y) >= this (default: never stop early)")
    p.add_argument("--threshold-from", default=None,
                   help="pgd: set the threshold to the mean D(x,y) of held-out real images in this .npz")
    p.add_argument("--sgld-step", type=float, default=None, help=f"sgld: per-image gradient step a (default: {sgld.step})")
    p.add_argument("--sgld-noise", type=float, default=None, help=f"sgld: noise scale s (default: {sgld.noise})")
    p.add_argument("--labels", default="file", choices=["file", "predicted"],
                   help="class labels from the sample file or the model's argmax (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU; first batch compiles)")
    p.add_argument("--no-grid", action="store_true", help="skip the before/after PNG grid")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    add_runtime_flags(p, PART_HELP)
    p.add_argument("--block-size", type=int, default=None,
                   help=f"{BLOCK_HELP} (default: the block 'cmboost tune' scored the --settings file with, so "
                        f"that boost writes the images tune scored; else {BLOCK_SIZE})")
    add_output_flags(p)
    p.set_defaults(run=run)
