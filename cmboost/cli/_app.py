"""The command line proper: the parser of every verb, and running one. `cmboost.cli` imports this
module only inside `main`, so that Ctrl-C while it (and torch) loads is caught there."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmboost import __version__
from cmboost.cli import boost as boost_verb
from cmboost.cli import check_judges as check_judges_verb
from cmboost.cli import convert as convert_verb
from cmboost.cli import demo as demo_verb
from cmboost.cli import diagnose as diagnose_verb
from cmboost.cli import evaluate as evaluate_verb
from cmboost.cli import evaluate_ref as evaluate_ref_verb
from cmboost.cli import info as info_verb
from cmboost.cli import sample as sample_verb
from cmboost.cli import train_cm as train_cm_verb
from cmboost.cli import train_features as train_features_verb
from cmboost.cli import train_jcd as train_jcd_verb
from cmboost.cli import tune as tune_verb
from cmboost.errors import UserInputError, one_line

VERB_MODULES = [demo_verb, info_verb, sample_verb, boost_verb, tune_verb, evaluate_verb, evaluate_ref_verb, check_judges_verb,
                train_cm_verb, train_jcd_verb, train_features_verb, convert_verb, diagnose_verb]
# The verbs built from a record, by name: each module's record_from(args) is the record the API builds too.
VERB_MODULES_BY_NAME = {"sample": sample_verb, "boost": boost_verb, "tune": tune_verb, "evaluate": evaluate_verb,
                        "evaluate-ref": evaluate_ref_verb, "check-judges": check_judges_verb, "train-cm": train_cm_verb,
                        "train-jcd": train_jcd_verb, "train-features": train_features_verb, "diagnose": diagnose_verb}


class OneLineParser(argparse.ArgumentParser):
    """A flag argparse cannot read (`--eps abc`, a missing `--out`) is one line too, not a usage
    block: the rule for bad input holds before the verb runs. Its verbs' parsers are of this class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cmboost",
        description="Sample from consistency models, boost the samples with a joint "
                    "classifier-discriminator, measure FID/IS/precision/recall, and train the networks.")
    parser.add_argument("--version", action="version", version=f"cmboost {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>")
    for module in VERB_MODULES:
        module.add_parser(verbs)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parses `argv` and runs the verb: bad input is one line and exit 2, Ctrl-C one line and 130."""
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except UserInputError as err:
        print(f"cmboost {args.verb}: error: {one_line(err)}", file=sys.stderr)  # a path's newline stays escaped
        return 2
    except KeyboardInterrupt:
        print(f"cmboost {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:
        # An output that cannot be written (full disk, no permission, ...) is the user's to fix: one
        # line. Any other OSError is a bug and keeps its traceback.
        path = output_culprit(err, args)
        if path is None:
            raise
        print(f"cmboost {args.verb}: error: {one_line(path)}: cannot write ({err.strerror or err})", file=sys.stderr)
        return 2


OUTPUT_FLAGS = ("out", "json", "run_dir", "out_dir")


def output_culprit(err: OSError, args: argparse.Namespace) -> str | None:
    """The output flag's path that `err` is about (the path itself, a folder above it, a file inside
    it, or a temp or parts file beside it), or None when the error is about something else."""
    if not err.filename:
        return None
    failed = Path(err.filename).absolute()
    for flag in OUTPUT_FLAGS:
        value = getattr(args, flag, None)
        if not value:
            continue
        out = Path(value).absolute()
        beside = failed.parent == out.parent and out.name in failed.name
        if failed == out or failed in out.parents or out in failed.parents or beside:
            return str(value)
    return None

