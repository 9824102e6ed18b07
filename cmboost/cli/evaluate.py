"""`cmboost evaluate`: FID, sFID, IS, precision, recall, KID, density and coverage of samples against
a reference (and FD_DINOv2 or other networks' Frechet distances with --features a,b). The old
spelling `cmboost evaluate ref ...` still runs `cmboost evaluate-ref`."""

from __future__ import annotations

import argparse
import sys

from cmboost.cli.common import add_feature_flags, check_feature_flags, extractors
from cmboost.cli.evaluate_ref import add_reference_flags
from cmboost.errors import UserInputError
from cmboost.cli.evaluate_ref import run_reference
from cmboost.files.atomic import refuse_existing
from cmboost.files.samples import open_samples
from cmboost.metrics.evaluate import evaluate_source, format_table, write_json
from cmboost.metrics.reference import load_references
from cmboost.runtime import dist_info


def run(args: argparse.Namespace) -> int:
    check_feature_flags(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.samples == "ref":

        return run_reference(args)
    return run_samples(args)


def run_samples(args: argparse.Namespace) -> int:

    if not args.ref:
        raise UserInputError("--ref REF.npz is required (make one with 'cmboost evaluate-ref')")
    if args.out is not None:
        raise UserInputError("--out is for 'cmboost evaluate-ref'; write results with --json PATH")
    if args.json:
        refuse_existing(args.json, args.overwrite, flag="--json")
    source = open_samples(args.samples)
    references = load_references(args.ref)
    result = evaluate_source(source, references, extractors(args), args.batch_size, progress=not args.quiet)
    if dist_info().is_main:
        fid_note = result.get("notes", {}).get("fid")
        if fid_note and "rank-deficient" in fid_note:
            print(f"cmboost evaluate: warning: {fid_note}", file=sys.stderr)
        print(format_table(result))
        if args.json:
            write_json(args.json, result, overwrite=args.overwrite)
            print(f"wrote {args.json}")
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
    add_reference_flags(p, hidden=True)
    add_feature_flags(p)
    p.set_defaults(run=run)
