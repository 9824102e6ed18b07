"""`cmboost sample`: draw samples from a consistency model (or an EDM teacher) into an OpenAI .npz."""

from __future__ import annotations

import argparse

from cmboost.cli.common import (BLOCK_HELP, PART_HELP, add_field_flag, add_output_flags, add_runtime_flags,
                                parse_int_list, record_from_args, set_record_defaults)
from cmboost.cm.denoiser import KINDS
from cmboost.cm.sample import CM_DEFAULT_STEPS, EDM_DEFAULT_STEPS, SampleRun, SampleSettings, sample
from cmboost.runtime import print0


def record_from(args: argparse.Namespace) -> SampleRun:
    return record_from_args(SampleRun, args, {
        "ts": parse_int_list(args.ts, "--ts"), "num_levels": args.N,
        "class_labels": parse_int_list(args.class_labels, "--class-labels"), "progress": not args.no_progress})


def run(args: argparse.Namespace) -> int:
    run = record_from(args)
    out = sample(run)
    print0(f"{out}: {run.num} samples")
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "sample", help="draw samples from a consistency model into an OpenAI-format .npz",
        description="Draws --num samples (1 or 2 steps; Heun for EDM teachers). Sample i depends only on "
                    "(--seed, i). Resumable: finished batches are kept in <out>.job/ and rerunning the "
                    "same command finishes the job. Shards across ranks under torchrun.")
    p.add_argument("--model", required=True,
                   help="cmboost .safetensors, OpenAI .pt (cd_imagenet64_l2.pt, ct_imagenet64.pt, ...) or a diffusers folder")
    add_field_flag(p, SampleSettings, "steps",
                   f"network evaluations of a consistency model, 1 or 2 (default: {CM_DEFAULT_STEPS}); "
                   f"Heun steps of an EDM teacher (default: {EDM_DEFAULT_STEPS})", type=int)
    p.add_argument("--ts", default=None, help="multistep indices into the N-level Karras grid, e.g. 0,22,39")
    p.add_argument("--N", type=int, default=None, help="levels of that grid (CD 40, CT 201)")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="model kind when the file name does not tell (OpenAI files)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--class-labels", default=None,
                   help="comma-separated classes to draw labels from (default: all classes, uniformly)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_flags(p, PART_HELP)
    set_record_defaults(p, SampleSettings, ("seed", "batch_size"))
    add_field_flag(p, SampleSettings, "block_size", BLOCK_HELP, type=int)
    add_output_flags(p)
    p.set_defaults(run=run)
