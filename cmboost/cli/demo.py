"""`cmboost demo`: sample, boost and evaluate on Fashion-MNIST with the shipped checkpoints."""

from __future__ import annotations

import argparse

from cmboost.demo.plan import DemoOptions
from cmboost.demo.run import run_demo
from cmboost.records import field_default


def run(args: argparse.Namespace) -> int:
    run_demo(DemoOptions(out_dir=args.out_dir, quick=args.quick, full=args.full, device=args.device, threads=args.threads,
                         overwrite=args.overwrite, progress=not args.quiet))
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser("demo", help="does boosting help? Fashion-MNIST, shipped checkpoints, independent judges",
                         description="Samples the shipped CT and CD models over several seeds, boosts them with "
                                     "the settings 'cmboost tune' chose (joint network: PGD and SGLD; classifier-only "
                                     "baseline; unsharp-mask and norm-matched random controls), and reports FID and "
                                     "KID +- std with reporting judges that took no part in the tuning. Writes "
                                     "OUT_DIR/report.md, report.json, labelled grids and the compute-frontier plot.")

    p.add_argument("--out-dir", default=field_default(DemoOptions, "out_dir"), help="where the report, grids, plot "
                   "and the cache of finished rows go (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="48 samples per row, 2 seeds: an end-to-end check, numbers "
                                                        "too noisy to read")
    p.add_argument("--full", action="store_true", help="1000 samples per row, the reference computed from the "
                                                       "test split, the frontier at 1-15 boosting steps (default: "
                                                       "250 samples per row over 3 seeds, shipped references, the "
                                                       "frontier at the tuned step count)")
    p.add_argument("--device", default=field_default(DemoOptions, "device"),
                   help="cuda, cuda:N, cpu, or auto: cuda when present (default: %(default)s)")
    p.add_argument("--threads", type=int, default=field_default(DemoOptions, "threads"),
                   help="torch CPU threads; 0 or unset: torch's choice (all cores)")
    p.add_argument("--overwrite", action="store_true", help="run again from scratch over an existing report or cache")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)
