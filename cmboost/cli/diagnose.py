"""`cmboost diagnose`: judge-free diagnostics of a joint network, written as diagnose.json and pag.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmboost.boosting.config import METHODS, PGD_SCORES, PGD_STEP_FACTOR, REALNESS_KINDS
from cmboost.cli.boost import hyper_from_args
from cmboost.cli.common import add_device_flags, add_field_flag, record_from_args, set_record_defaults
from cmboost.diagnostic.diagnose import DiagnoseRun, diagnose_files
from cmboost.diagnostic.measures import DiagnoseSettings
from cmboost.diagnostic.report import JSON_NAME, PNG_NAME
from cmboost.errors import UserInputError
from cmboost.files.datasets import FMNIST_HELD_OUT_START
from cmboost.records import field_default


def parse_generators(specs: list[str]) -> list[tuple[str, str]]:
    """--samples NAME=PATH or PATH (named by the file's stem): (name, path) pairs, names unique."""

    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise UserInputError(f"--samples {spec!r}: expected NAME=PATH or PATH")
        if name in (n for n, _ in pairs):
            raise UserInputError(f"--samples {spec!r}: the name {name!r} is given twice; name them NAME=PATH")
        pairs.append((name, path))
    return pairs


def record_from(args: argparse.Namespace):
    numbers = record_from_args(DiagnoseSettings, args, {})  # bad numbers fail before anything is read
    return record_from_args(DiagnoseRun, args, {"samples": tuple(parse_generators(args.samples)),
                                                "settings_files": tuple(args.settings or ()),
                                                "hyper": hyper_from_args(args), "numbers": numbers})


def run(args: argparse.Namespace) -> int:
    diagnose_files(record_from(args))
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "diagnose", help="judge-free diagnostics of a joint network: robustness, realness AUC, score alignment, PAGs",
        description=f"Writes OUT/{JSON_NAME} and OUT/{PNG_NAME}: clean and L2-PGD robust accuracy on held-out real "
                    "images; the rank AUC of the network's realness D(x,y), real against each --samples file, "
                    "before and after boosting (--settings from 'cmboost tune', or boost's method flags), with mean "
                    "p(y|x); the cosine between grad_x log p(y|x) and the class-conditional score of an EDM "
                    "--teacher, (D(x;sigma,y)-x)/sigma^2, on real and generated images (perceptual alignment, "
                    "Srinivas et al. 2023); and targeted large-eps PGD from grey and from real images toward "
                    f"every class as a picture. Attack steps are {PGD_STEP_FACTOR}*eps/steps, with no random start.")
    p.add_argument("--model", required=True, help="joint network checkpoint")
    p.add_argument("--samples", action="append", default=[], metavar="[NAME=]PATH",
                   help="a generator's labelled samples (.npz or PNG folder); repeat for several (default: none)")
    p.add_argument("--teacher", default=None,
                   help="EDM teacher .safetensors (cmboost train-cm --mode edm) for the score; without it the "
                        "alignment is not measured")
    p.add_argument("--real", default=None,
                   help=f"held-out labelled real images (.npz or PNG folder) (default: Fashion-MNIST "
                        f"train[{FMNIST_HELD_OUT_START}:], which the recipe keeps from the joint networks, padded to "
                        f"the network's size)")
    p.add_argument("--settings", action="append", default=[],
                   help="settings file from 'cmboost tune': once for every --samples, or once per --samples in order")
    p.add_argument("--allow-other-network", action="store_true",
                   default=field_default(DiagnoseRun, "allow_other_network"),
                   help="use --settings files tuned for another network than --model (refused otherwise; the "
                        "mismatch is recorded in the report's provenance)")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help="boosting method (default: pgd, or the method chosen in --settings)")
    p.add_argument("--steps", type=int, default=None, help="boosting steps, as in 'cmboost boost'")
    p.add_argument("--eps", type=float, default=None, help="boosting L2 radius, as in 'cmboost boost'")
    p.add_argument("--step-size", type=float, default=None, help="boosting step length, as in 'cmboost boost'")
    p.add_argument("--objective", default=None, choices=PGD_SCORES, help="pgd score, as in 'cmboost boost'")
    p.add_argument("--realness", default=None, choices=REALNESS_KINDS,
                   help="reading of D(x,y) for the AUC and pgd (default: the one the network was trained with, "
                        "else softmax)")
    p.add_argument("--threshold", type=float, default=None, help="pgd early stop, as in 'cmboost boost'")
    p.add_argument("--sgld-step", type=float, default=None, help="sgld step, as in 'cmboost boost'")
    p.add_argument("--sgld-noise", type=float, default=None, help="sgld noise, as in 'cmboost boost'")
    add_field_flag(p, DiagnoseSettings, "num_real", "held-out real images used (drawn with --seed; all when fewer)",
                   type=int)
    add_field_flag(p, DiagnoseSettings, "num_samples", "images used from each --samples file, its first ones "
                   "(default: all)", type=int)
    add_field_flag(p, DiagnoseSettings, "attack_eps", "L2 radii of the robust accuracy", type=float, nargs="+",
                   metavar="EPS")
    add_field_flag(p, DiagnoseSettings, "attack_steps", "untargeted PGD steps of the robust accuracy", type=int)
    add_field_flag(p, DiagnoseSettings, "sigmas", "noise levels of the teacher's score, in its [-1, 1] units",
                   type=float, nargs="+", metavar="SIGMA")
    add_field_flag(p, DiagnoseSettings, "pag_eps", "L2 radius of the PAG picture's targeted PGD", type=float)
    add_field_flag(p, DiagnoseSettings, "pag_steps", "steps of the PAG picture's targeted PGD", type=int)
    add_field_flag(p, DiagnoseSettings, "pag_rows", "real starting images in the PAG picture (after the grey one)",
                   type=int)
    add_field_flag(p, DiagnoseSettings, "seed", "draws the real images, the picture's starts and SGLD's noise",
                   type=int)
    add_field_flag(p, DiagnoseSettings, "batch_size", "images the networks see together (the numbers depend on "
                   "it, slightly)", type=int)
    add_field_flag(p, DiagnoseSettings, "threads", "torch CPU threads; 0: torch's choice", type=int)
    add_device_flags(p)
    set_record_defaults(p, DiagnoseRun, ("device", "precision"))
    p.add_argument("--out", required=True, help=f"output folder for {JSON_NAME} and {PNG_NAME}")
    p.add_argument("--overwrite", action="store_true", help=f"replace {JSON_NAME} and {PNG_NAME} if they exist")
    p.set_defaults(run=run)
