"""`cmboost evaluate`: FID, sFID, IS, precision, recall, KID, density and coverage of samples against
a reference (and FD_DINOv2 or other networks' Frechet distances with --features a,b). The old
spelling `cmboost evaluate ref ...` still runs `cmboost evaluate-ref`."""

from __future__ import annotations

import argparse
import sys

from cmboost.cli import evaluate_ref as evaluate_ref_verb
from cmboost.cli.common import add_feature_flags, record_from_args
from cmboost.errors import UserInputError
from cmboost.metrics.evaluate import EvaluateRun, evaluate, format_table
from cmboost.runtime import dist_info


def record_from(args: argparse.Namespace) -> EvaluateRun:
    if args.out is not None:
        raise UserInputError("--out is for 'cmboost evaluate-ref'; write results with --json PATH")
    refs = tuple(part for given in args.ref for part in given.split(",") if part)
    return record_from_args(EvaluateRun, args, {"refs": refs, "progress": not args.quiet})


def run(args: argparse.Namespace) -> int:
    if args.samples == "ref":
        return evaluate_ref_verb.run(args)
    run = record_from(args)
    result = evaluate(run)
    if dist_info().is_main:
        fid_note = result.get("notes", {}).get("fid")
        if fid_note and "rank-deficient" in fid_note:
            print(f"cmboost evaluate: warning: {fid_note}", file=sys.stderr)
        print(format_table(result))
        if run.json:
            print(f"wrote {run.json}")
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "evaluate", help="FID, sFID, IS, precision/recall, KID, density/coverage (and FD_DINOv2) of samples",
        description="cmboost evaluate SAMPLES --ref REF.npz [--features inception[,dinov2]] [--json OUT]\n\n"
                    "The guided-diffusion protocol: FID on pool features, sFID on Inception's mixed_6/conv "
                    "(n/a for nets without spatial features), IS over splits of 5000, k=3 precision/recall, "
                    "plus KID and density/coverage on the same k=3 balls. With several --features, also the "
                    "Frechet distance in each network's features (fd_inception, fd_dinov2, ...) against the "
                    "--ref made with it (an EDM2 .pkl holds Inception and DINOv2 statistics). Features are "
                    "computed in fp32 unless --precision says otherwise. Under torchrun the feature "
                    "extraction is sharded across ranks. References: 'cmboost evaluate-ref'.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="samples .npz (OpenAI layout) or PNG folder")
    p.add_argument("--ref", action="append", default=[],
                   help="reference .npz (OpenAI's, or from 'cmboost evaluate-ref') or EDM2-style .pkl; repeat "
                        "the flag or separate with commas to give one per feature network")
    p.add_argument("--json", default=None, help="also write the results here (JSON, docs/evaluation.md)")
    evaluate_ref_verb.add_reference_flags(p, hidden=True)
    add_feature_flags(p)
    p.set_defaults(run=run)
