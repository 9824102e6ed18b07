"""`cmboost diagnose`: judge-free diagnostics of a joint network, written as diagnose.json and pag.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmboost.cli.common import add_device_flags, add_field_flag, record_from_args


def parse_generators(specs: list[str]) -> list[tuple[str, str]]:
    """--samples NAME=PATH or PATH (named by the file's stem): (name, path) pairs, names unique."""
    from cmboost.errors import UserInputError

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


def boost_choices(args: argparse.Namespace, count: int) -> list[tuple[str, dict]]:
    """(method, hyper) for each of `count` generators: --settings once for all, or once per --samples in
    order, each overridden by the method flags given; without --settings, the method flags (or the
    boost verb's defaults)."""
    from cmboost.boost_config import make_hyper
    from cmboost.boost_job import DEFAULT_METHOD, given_hyper
    from cmboost.cli.boost import hyper_from_args
    from cmboost.errors import UserInputError
    from cmboost.tuning import load_settings_file, tuned_hyper

    if not args.settings:
        method = args.method or DEFAULT_METHOD
        hyper = given_hyper(method, hyper_from_args(args), args.seed)
        make_hyper(method, **hyper)  # checked even without --samples: a bad flag is never silently unused
        return [(method, hyper)] * count
    if count == 0:
        raise UserInputError("--settings: boosts the --samples files, and none is given")
    if len(args.settings) not in (1, count):
        raise UserInputError(f"--settings: given {len(args.settings)} times for {count} --samples; give it once "
                             f"(for all) or once per --samples, in the same order")
    choices = []
    for path in args.settings if len(args.settings) == count else args.settings * count:
        method, tuned = tuned_hyper(load_settings_file(path), args.method, path)
        if args.threshold is not None:
            tuned.pop("threshold", None)
        flags = given_hyper(method, hyper_from_args(args), args.seed)
        choices.append((method, {**tuned, **flags}))  # a flag given explicitly overrides the tuned value
    return choices


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    import numpy as np
    import torch

    from cmboost.boost_config import make_hyper
    from cmboost.boost_config import DEFAULT_REALNESS
    from cmboost.boost_job import check_fits_model, trained_realness_kind, with_trained_radius
    from cmboost.checkpoints import weights_digest
    from cmboost.data import FMNIST_HELD_OUT_START, load_dataset
    from cmboost.diagnostic import (DiagnoseSettings, GeneratorSamples, check_outputs, diagnose,
                                  format_summary, load_teacher_score, select_real, write_diagnosis)
    from cmboost.errors import UserInputError
    from cmboost.jcd import load_joint_model
    from cmboost.jobs import file_digest
    from cmboost.runtime import resolve_device, resolve_precision
    from cmboost.samples import load_samples

    started = time.perf_counter()
    settings = record_from_args(DiagnoseSettings, args, {})  # bad numbers fail before anything is read
    generators = parse_generators(args.samples)
    for flag, path in [("--model", args.model), ("--teacher", args.teacher), ("--real", args.real),
                       *(("--samples", path) for _, path in generators)]:
        if path is not None and not Path(path).exists():
            raise UserInputError(f"{flag} {path}: file not found")
    choices = [(method, with_trained_radius(method, hyper, args.model))
               for method, hyper in boost_choices(args, len(generators))]
    records = [(method, make_hyper(method, **hyper)) for method, hyper in choices]  # checked before loading
    check_outputs(args.out, args.overwrite)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    model = load_joint_model(args.model).to(device)
    kind = args.realness or trained_realness_kind(args.model) or DEFAULT_REALNESS
    shape = (model.in_channels, model.image_size, model.image_size)
    score = load_teacher_score(args.teacher, device, precision, shape, model.num_classes) if args.teacher else None

    if args.real:
        real, real_labels = load_samples(args.real, num_classes=model.num_classes)
        if real_labels is None:
            raise UserInputError(f"--real {args.real}: needs labels (arr_1)")
        check_fits_model(real, real_labels, model, f"--real {args.real}")
        real_source, offset = str(args.real), 0
    else:
        real, real_labels, _ = load_dataset("fmnist", "train", image_size=model.image_size)
        real, real_labels = real[FMNIST_HELD_OUT_START:], real_labels[FMNIST_HELD_OUT_START:]
        check_fits_model(real, real_labels, model, "Fashion-MNIST (the default --real)")
        real_source, offset = (f"fmnist train[{FMNIST_HELD_OUT_START}:] padded to {model.image_size}",
                               FMNIST_HELD_OUT_START)
    chosen = select_real(real_labels, settings.num_real, settings.seed)
    real, real_labels = real[chosen], real_labels[chosen]

    samples = []
    for (name, path), (method, hyper), (_, record) in zip(generators, choices, records):
        images, labels = load_samples(path, num_classes=model.num_classes)
        if labels is None:
            raise UserInputError(f"--samples {path}: needs labels (arr_1): each image is read with its class")
        check_fits_model(images, labels, model, f"--samples {path}")
        if method == "pgd" and "realness_kind" not in hyper:
            record = dataclasses.replace(record, realness_kind=kind)  # the reading the network was trained with
        n = len(images) if settings.num_samples is None else min(settings.num_samples, len(images))
        samples.append(GeneratorSamples(name, np.ascontiguousarray(images[:n]), labels[:n], method, record, str(path)))

    report, grid = diagnose(model, real, real_labels, samples, score, settings, kind, device, precision,
                            model.num_classes, real_ids=offset + chosen)
    report["provenance"] = {
        "model": str(args.model), "model_digest": weights_digest(model),
        "teacher": str(args.teacher) if args.teacher else None,
        "teacher_digest": file_digest(args.teacher) if args.teacher else None,
        "real": real_source, "real_digest": file_digest(args.real) if args.real else None,
        "samples": {name: {"path": str(path), "digest": file_digest(path)} for name, path in generators},
        "settings_files": list(args.settings or [])}
    json_path, png_path = write_diagnosis(args.out, report, grid, overwrite=args.overwrite)
    print(format_summary(report))
    if score is None:
        print("no --teacher: gradient-score alignment not measured")
    print(f"wrote {json_path} and {png_path} ({time.perf_counter() - started:.0f} s)")
    return 0


def add_parser(verbs) -> None:
    from cmboost.data import FMNIST_HELD_OUT_START
    from cmboost.boost_config import METHODS, PGD_SCORES, REALNESS_KINDS
    from cmboost.boost_config import PGD_STEP_FACTOR
    from cmboost.diagnostic import JSON_NAME, PNG_NAME, DiagnoseSettings

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
    p.set_defaults(precision="fp32")
    p.add_argument("--out", required=True, help=f"output folder for {JSON_NAME} and {PNG_NAME}")
    p.add_argument("--overwrite", action="store_true", help=f"replace {JSON_NAME} and {PNG_NAME} if they exist")
    p.set_defaults(run=run)
