"""`cmboost check-judges`: validate candidate judges (degradation ladder, adversarial transfer) before they
report."""

from __future__ import annotations

import argparse
import functools

from cmboost.cli.common import add_field_flag, add_output_flags, record_from_args
from cmboost.metrics.check_judges import JudgeCheckRun, check_judges
from cmboost.metrics.judge_check import CheckSettings
from cmboost.records import field_default


def record_from(args: argparse.Namespace):
    settings = CheckSettings(seed=args.seed, bootstrap=args.bootstrap)
    judges = tuple(j.strip() for j in args.judges.split(",") if j.strip())
    return record_from_args(JudgeCheckRun, args, {"judges": judges, "settings": settings})


def run(args: argparse.Namespace) -> int:
    record = record_from(args)
    check_judges(record)
    print(f"wrote {record.out}")
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "check-judges", help="validate candidate judges: a degradation ladder and an adversarial-transfer test",
        description="A judge passes when its FID rises monotonically along ladders of blur, noise, JPEG and "
                    "mixed-in generated images, and does not fall beyond its error bar when generated images are "
                    "edited adversarially for a plain classifier unrelated to it (the attacker). The first "
                    "--reference-count real images make the reference, the next --num the clean rung. A rerun "
                    "of the same command resumes judge by judge.")
    field = functools.partial(add_field_flag, p, JudgeCheckRun)
    p.add_argument("--samples", required=True, help="generated samples (.npz with labels) for the mixes and the edits")
    p.add_argument("--judges", default=",".join(field_default(JudgeCheckRun, "judges")),
                   help="candidate judges, comma-separated (default: %(default)s)")
    field("attacker", "the plain classifier whose edits probe the judges")
    field("data", "real data")
    field("split", "its split")
    field("data_dir", "folder of the Fashion-MNIST files (default: system copy)")
    field("reference_count", "real images in the reference", type=int)
    field("num", "images per rung and per edit", type=int)
    add_field_flag(p, CheckSettings, "bootstrap", "paired bootstrap resamples of the transfer test", type=int)
    add_field_flag(p, CheckSettings, "seed", "seed of the noise, the mixes, the random edits and the bootstrap",
                   type=int)
    field("threads", "torch CPU threads; 0: torch's choice", type=int)
    field("device", "cuda, cuda:N, cpu, or auto: cuda when present; judges run in fp32")
    add_output_flags(p)
    p.set_defaults(run=run)
