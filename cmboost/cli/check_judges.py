"""`cmboost check-judges`: validate candidate judges (degradation ladder, adversarial transfer) before they report."""

from __future__ import annotations

import argparse

from cmboost.cli.common import add_field_flag, add_output_flags


def run(args: argparse.Namespace) -> int:
    import json
    import shutil

    import torch

    from cmboost.atomic import atomic_write_text, refuse_existing
    from cmboost.data import load_dataset
    from cmboost.errors import UserInputError
    from cmboost.jobs import job_dir
    from cmboost.metrics.judge_check import CheckSettings, format_table, run_judge_check
    from cmboost.runtime import resolve_device
    from cmboost.samples import load_samples

    settings = CheckSettings(seed=args.seed, bootstrap=args.bootstrap)
    judges = [j.strip() for j in args.judges.split(",") if j.strip()]
    if not judges:
        raise UserInputError("--judges: name at least one judge")
    for flag, value, low in (("--reference-count", args.reference_count, 2), ("--num", args.num, 2),
                             ("--threads", args.threads, 0)):
        if value < low:
            raise UserInputError(f"{flag} {value}: must be >= {low}")
    refuse_existing(args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    generated, labels = load_samples(args.samples)
    if labels is None:
        raise UserInputError(f"{args.samples}: holds no class labels; the transfer edits need the classes")
    real, _, _ = load_dataset(args.data, args.split, args.data_dir, image_size=generated.shape[-1])
    folder = job_dir(args.out)  # finished judges: a rerun of the same command resumes
    report = run_judge_check(judges, real, generated, labels, args.attacker, args.reference_count, args.num,
                             settings, resolve_device(args.device), job_folder=folder)
    report["data"].update(real=f"{args.data} {args.split}", samples=str(args.samples))
    print(format_table(report))
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


def add_parser(verbs) -> None:
    from cmboost.metrics.judge_check import DEFAULT_ATTACKER, DEFAULT_CANDIDATES, CheckSettings

    p = verbs.add_parser(
        "check-judges", help="validate candidate judges: a degradation ladder and an adversarial-transfer test",
        description="A judge passes when its FID rises monotonically along ladders of blur, noise, JPEG and "
                    "mixed-in generated images, and does not fall beyond its error bar when generated images are "
                    "edited adversarially for a plain classifier unrelated to it (the attacker). The first "
                    "--reference-count real images make the reference, the next --num the clean rung.")
    p.add_argument("--samples", required=True, help="generated samples (.npz with labels) for the mixes and the edits")
    p.add_argument("--judges", default=",".join(DEFAULT_CANDIDATES),
                   help="candidate judges, comma-separated (default: %(default)s)")
    p.add_argument("--attacker", default=DEFAULT_ATTACKER,
                   help="the plain classifier whose edits probe the judges (default: %(default)s)")
    p.add_argument("--data", default="fmnist", help="real data (default: %(default)s)")
    p.add_argument("--split", default="test", help="its split (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files (default: system copy)")
    p.add_argument("--reference-count", type=int, default=5000, help="real images in the reference (default: %(default)s)")
    p.add_argument("--num", type=int, default=1000, help="images per rung and per edit (default: %(default)s)")
    add_field_flag(p, CheckSettings, "bootstrap", "paired bootstrap resamples of the transfer test", type=int)
    add_field_flag(p, CheckSettings, "seed", "seed of the noise, the mixes, the random edits and the bootstrap",
                   type=int)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's choice (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cuda, cuda:N, cpu, or auto: cuda when present; judges run in fp32 (default: %(default)s)")
    add_output_flags(p)
    p.set_defaults(run=run)
