"""`cmboost tune`: choose the boosting method and settings on validation samples with a tuning judge."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmboost.cli.common import add_device_flags, add_field_flag, record_from_args


def split_list(value: str, flag: str) -> list[str]:
    """A comma-separated flag value as its items, or one line naming the flag when one is empty."""
    from cmboost.errors import UserInputError

    items = [item.strip() for item in str(value).split(",")]
    if not all(items):
        raise UserInputError(f"{flag} {value}: an empty name between commas")
    return items


def run(args: argparse.Namespace) -> int:
    from cmboost.boost_config import DEFAULT_REALNESS
    from cmboost.boost_job import resolve_threshold, trained_radius, trained_realness_kind
    from cmboost.errors import UserInputError
    from cmboost.jcd import load_joint_model
    from cmboost.metrics.features import load_feature_extractor
    from cmboost.metrics.judges import refuse_reporting_name
    from cmboost.metrics.reference import load_reference
    from cmboost.runtime import print0, resolve_device, resolve_precision
    from cmboost.atomic import refuse_existing
    from cmboost.tune import TuneSettings, check_classifier, check_grid, check_radius, format_table, read_grid, tune

    radius_from = "--robust-radius" if args.robust_radius is not None else None
    if radius_from is None and Path(args.model).is_file():
        # Unless told otherwise, a train-jcd network's robust radius is the one it was adversarially trained at.
        args.robust_radius = trained_radius(args.model)
        if args.robust_radius is not None:
            radius_from = "the network's training attack (train-jcd --real-eps)"
    choice = record_from_args(TuneSettings, args, {})  # bad values fail before anything is loaded
    names = split_list(args.judge, "--judge")
    refs = [ref for value in args.ref for ref in split_list(value, "--ref")]
    if len(refs) != len(names):
        raise UserInputError(f"--ref: {len(names)} judge{'s' if len(names) > 1 else ''} (--judge {args.judge}) need "
                             f"one reference each, in the same order; got {len(refs)} ({', '.join(refs)})")
    for name in names:  # the commonest mistake fails before anything is loaded; tune() checks weights
        refuse_reporting_name(name)
    grid = None
    if args.grid:  # the file's shape and every candidate are checked before anything is loaded
        grid = read_grid(args.grid)
        check_radius(check_grid(grid, args.classifier is not None, source=f"--grid {args.grid}"), choice)
    refuse_existing(args.out, args.overwrite)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    judges = [load_feature_extractor(name, device) for name in names]
    references = [load_reference(ref) for ref in refs]
    model = load_joint_model(args.model).to(device)
    classifier = load_joint_model(args.classifier).to(device) if args.classifier else None
    if classifier is not None:
        check_classifier(classifier, model, f"--classifier {args.classifier}")
    kind = trained_realness_kind(args.model) or DEFAULT_REALNESS
    threshold = resolve_threshold(model, None, args.threshold_from, kind, device, precision) \
        if args.threshold_from else None
    provenance = {"samples": args.samples, "model": args.model, "classifier": args.classifier,
                  "threshold_from": args.threshold_from, "threshold": threshold,
                  "reference": refs[0] if len(refs) == 1 else refs, "robust_radius_from": radius_from}
    one = len(judges) == 1  # one judge: the arguments, and so the file, as before committees
    settings = tune(args.samples, model, references[0] if one else references, judges[0] if one else judges,
                    args.out, classifier=classifier, threshold=threshold, grid=grid, criterion=choice.criterion,
                    max_recall_drop=choice.max_recall_drop, realness_kind=kind, device=device, precision=precision,
                    batch_size=choice.batch_size, provenance=provenance, overwrite=args.overwrite,
                    progress=not args.no_progress, grid_source=f"--grid {args.grid}" if args.grid else "grid",
                    classifier_source=f"--classifier {args.classifier}", robust_radius=choice.robust_radius,
                    allow_beyond_radius=choice.allow_beyond_radius)
    print0(format_table(settings))
    print0(f"wrote {args.out}; use it with: cmboost boost SAMPLES --model {args.model} --settings {args.out} --out OUT")
    return 0


def add_parser(verbs) -> None:
    from cmboost.metrics.judges import TUNING_JUDGE
    from cmboost.records import field_default
    from cmboost.tune import CRITERIA, TuneSettings

    p = verbs.add_parser(
        "tune", help="choose the boosting method and settings with a tuning judge",
        description="Boost validation samples with every candidate setting (PGD, SGLD, BIGRoC with --classifier, "
                    "and the unsharp-mask control), score each with a tuning judge (or a committee of them, "
                    "--judge a,b,c) against training-data statistics, and write the best settings as JSON for 'cmboost boost --settings'. Reporting "
                    "judges are refused. Rerunning the same command resumes.")
    p.add_argument("samples", help="validation samples (.npz with labels), not the ones you will report on")
    p.add_argument("--model", required=True, help="joint network checkpoint")
    p.add_argument("--classifier", default=None, help="robust classifier for the BIGRoC candidates (optional)")
    p.add_argument("--ref", required=True, action="append",
                   help="reference made from TRAINING data by the tuning judge (cmboost evaluate-ref --split train "
                        "--features JUDGE); with a committee, one per judge in --judge's order (repeat the flag, "
                        "or separate them with commas)")
    p.add_argument("--judge", default=TUNING_JUDGE,
                   help="tuning judge, or a committee of them separated by commas (a,b,c): the chosen candidate "
                        "is then the one whose worst relative FID and KID change across the judges is lowest, "
                        "recall kept under each; reporting judges are refused (default: %(default)s)")
    p.add_argument("--threshold-from", default=None,
                   help="held-out real images (.npz): adds PGD candidates with early stop at their mean realness")
    p.add_argument("--grid", default=None, help="JSON {method: [{hyper}, ...]} replacing the default candidates "
                                                "(an optional \"format\": \"cmboost.grid/1\" key)")
    add_field_flag(p, TuneSettings, "criterion", "what the judges minimise: fid, kid, or fid+kid (the worse of the "
                   "two relative changes) (default: fid with one judge, fid+kid with a committee)", choices=CRITERIA)
    add_field_flag(p, TuneSettings, "max_recall_drop",
                   "candidates that lose more recall than this (vs unboosted, under any judge) are not chosen",
                   type=float)
    add_field_flag(p, TuneSettings, "robust_radius", "the booster's robust L2 radius: PGD and BIGRoC candidates "
                   "with a larger eps are marked in the file and the table, and not chosen (default: the radius of the "
                   "real-image attack a train-jcd network was trained with, recorded in it; none for other networks)",
                   type=float)
    p.add_argument("--allow-beyond-radius", action="store_true", default=field_default(TuneSettings,
                   "allow_beyond_radius"), help="candidates beyond --robust-radius may be chosen (still marked)")
    p.add_argument("--out", required=True, help="settings file to write (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the settings file if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_flags(p)
    add_field_flag(p, TuneSettings, "batch_size", "images boosted together, image i in block i // size "
                   "(boost's --block-size; the images depend on it): recorded in the settings file, and "
                   "'cmboost boost --settings' boosts with it", type=int)
    p.set_defaults(run=run)
