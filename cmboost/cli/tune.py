"""`cmboost tune`: choose the boosting method and settings on validation samples with a tuning judge."""

from __future__ import annotations

import argparse

from cmboost.cli.common import add_device_flags, add_field_flag, record_from_args, set_record_defaults
from cmboost.errors import UserInputError
from cmboost.records import field_default
from cmboost.runtime import print0
from cmboost.tuning.candidates import CRITERIA, TuneSettings
from cmboost.tuning.table import format_table
from cmboost.tuning.tune import TuneRun, tune_files


def split_list(value: str, flag: str) -> list[str]:
    """A comma-separated flag value as its items, or one line naming the flag when one is empty."""

    items = [item.strip() for item in str(value).split(",")]
    if not all(items):
        raise UserInputError(f"{flag} {value}: an empty name between commas")
    return items


def record_from(args: argparse.Namespace):
    names = tuple(split_list(args.judge, "--judge"))
    refs = tuple(ref for value in args.ref for ref in split_list(value, "--ref"))
    choice = record_from_args(TuneSettings, args, {})
    return record_from_args(TuneRun, args, {"judges": names, "refs": refs, "choice": choice,
                                            "progress": not args.no_progress})


def run(args: argparse.Namespace) -> int:
    record = record_from(args)
    settings = tune_files(record)
    print0(format_table(settings))
    print0(f"wrote {record.out}; use it with: cmboost boost SAMPLES --model {record.model} --settings {record.out} "
           f"--out OUT")
    return 0


def add_parser(verbs) -> None:
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
    p.add_argument("--judge", default=",".join(field_default(TuneRun, "judges")),
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
    set_record_defaults(p, TuneRun, ("device", "precision"))
    add_field_flag(p, TuneSettings, "batch_size", "images boosted together, image i in block i // size "
                   "(boost's --block-size; the images depend on it): recorded in the settings file, and "
                   "'cmboost boost --settings' boosts with it", type=int)
    p.set_defaults(run=run)
