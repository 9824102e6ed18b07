"""The diagnose verb on files (`cmboost diagnose`, `cmboost.diagnose`): a joint network, held-out real
images, generators' samples and how to boost them in; diagnose.json and pag.png out (measures.py, pag.py, report.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmboost.boosting.boost import (DEFAULT_METHOD, check_fits_model, given_hyper, trained_realness_kind,
                                    with_trained_radius)
from cmboost.boosting.config import DEFAULT_REALNESS, PGD_STEP_FACTOR, make_hyper
from cmboost.boosting.settings import check_settings_network, do_not_boost, load_settings_file, tuned_hyper
from cmboost.diagnostic.measures import (FORMAT, GREY, DiagnoseSettings, GeneratorSamples, Score, alignment_rows,
                                         boost_images, clean_accuracy, load_teacher_score, rank_auc, realness_and_prob,
                                         robust_accuracy)
from cmboost.diagnostic.pag import pag_grid, pag_targets, pick_starts
from cmboost.diagnostic.report import PNG_NAME, check_outputs, format_summary, write_diagnosis
from cmboost.errors import UserInputError
from cmboost.files.atomic import refuse_output_inside_inputs
from cmboost.files.checkpoints import weights_digest
from cmboost.files.datasets import FMNIST_HELD_OUT_START, load_dataset
from cmboost.files.samples import load_samples, to_float
from cmboost.jcd.model import load_joint_model
from cmboost.jobs.config import file_digest
from cmboost.runtime import resolve_device, resolve_precision


@dataclasses.dataclass(frozen=True)
class DiagnoseRun:
    """One diagnose run, checked when built. `samples` are (name, path) pairs; each is boosted with
    the method of its settings file (`settings_files`: one for all, or one per sample file, in order)
    or with `method`, `hyper` overriding the tuned values (boost's flags)."""

    model: str
    out: str
    samples: tuple = ()
    teacher: str | None = None          # an EDM teacher: its score for the gradient alignment
    real: str | None = None             # None: Fashion-MNIST train[FMNIST_HELD_OUT_START:]
    settings_files: tuple = ()
    method: str | None = None
    hyper: dict = dataclasses.field(default_factory=dict)
    realness: str | None = None         # None: the reading the network was trained with, else DEFAULT_REALNESS
    numbers: DiagnoseSettings = DiagnoseSettings()
    device: str = "auto"
    precision: str = "fp32"             # the diagnostic's numbers compare across machines in fp32
    allow_other_network: bool = False   # settings files tuned for another network (recorded in the provenance)
    overwrite: bool = False

    def __post_init__(self):
        names = [name for name, _ in self.samples]
        if len(set(names)) != len(names):
            raise UserInputError(f"--samples: a name is given twice ({', '.join(names)}); name them NAME=PATH")


def boost_choices(run: DiagnoseRun, count: int) -> list[tuple[str, dict]]:
    """(method, hyper) for each of `count` generators: --settings once for all, or once per --samples in
    order, each overridden by the method flags given; without --settings, the method flags (or the
    boost verb's defaults)."""

    if not run.settings_files:
        method = run.method or DEFAULT_METHOD
        hyper = given_hyper(method, run.hyper, run.numbers.seed)
        make_hyper(method, **hyper)  # checked even without --samples: a bad flag is never silently unused
        return [(method, hyper)] * count
    if count == 0:
        raise UserInputError("--settings: boosts the --samples files, and none is given")
    if len(run.settings_files) not in (1, count):
        raise UserInputError(f"--settings: given {len(run.settings_files)} times for {count} --samples; give it once "
                             f"(for all) or once per --samples, in the same order")
    choices = []
    files = run.settings_files if len(run.settings_files) == count else run.settings_files * count
    for path in files:
        settings = load_settings_file(path)
        # A file that answers "do not boost" still names the candidate its choosing half preferred: the
        # diagnostic measures what that edit does (it judges no image quality, so it needs no confirmation).
        chosen = run.method or (settings.get("choice") if do_not_boost(settings) else None)
        method, tuned = tuned_hyper(settings, chosen, path)
        if run.hyper.get("threshold") is not None:
            tuned.pop("threshold", None)
        flags = given_hyper(method, run.hyper, run.numbers.seed)
        choices.append((method, {**tuned, **flags}))  # a flag given explicitly overrides the tuned value
    return choices


def diagnose_files(run: DiagnoseRun) -> dict:
    """Diagnoses run.model on its files, writes OUT/diagnose.json and OUT/pag.png, returns the report."""
    import time

    import numpy as np
    import torch


    started = time.perf_counter()
    settings = run.numbers
    generators = list(run.samples)
    for flag, path in [("--model", run.model), ("--teacher", run.teacher), ("--real", run.real),
                       *(("--samples", path) for _, path in generators)]:
        if path is not None and not Path(path).exists():
            raise UserInputError(f"{flag} {path}: file not found")
    choices = [(method, with_trained_radius(method, hyper, run.model))
               for method, hyper in boost_choices(run, len(generators))]
    records = [(method, make_hyper(method, **hyper)) for method, hyper in choices]  # checked before loading
    check_outputs(run.out, run.overwrite)
    refuse_output_inside_inputs(run.out, [("--samples", path) for _, path in generators] + [("--real", run.real)])
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    if settings.threads:
        torch.set_num_threads(settings.threads)

    model = load_joint_model(run.model)
    model_digest = weights_digest(model)
    other_network = {}  # settings file -> the network it was tuned for, where that is not --model
    for path in dict.fromkeys(run.settings_files):
        tuned = load_settings_file(path)
        line = check_settings_network(tuned, path, run.model, model_digest, run.allow_other_network)
        if line is not None:
            other_network[str(path)] = tuned["fingerprint"]["model"]
            print(f"{line}; used all the same (--allow-other-network)")
    model = model.to(device)
    kind = run.realness or trained_realness_kind(run.model) or DEFAULT_REALNESS
    shape = (model.in_channels, model.image_size, model.image_size)
    score = load_teacher_score(run.teacher, device, precision, shape, model.num_classes) if run.teacher else None

    if run.real:
        real, real_labels = load_samples(run.real, num_classes=model.num_classes)
        if real_labels is None:
            raise UserInputError(f"--real {run.real}: needs labels (arr_1)")
        check_fits_model(real, real_labels, model, f"--real {run.real}")
        real_source, offset = str(run.real), 0
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
        "model": str(run.model), "model_digest": model_digest,
        "teacher": str(run.teacher) if run.teacher else None,
        "teacher_digest": file_digest(run.teacher) if run.teacher else None,
        "real": real_source, "real_digest": file_digest(run.real) if run.real else None,
        "samples": {name: {"path": str(path), "digest": file_digest(path)} for name, path in generators},
        "settings_files": list(run.settings_files), "settings_tuned_for_other_network": other_network}
    json_path, png_path = write_diagnosis(run.out, report, grid, overwrite=run.overwrite)
    print(format_summary(report))
    if score is None:
        print("no --teacher: gradient-score alignment not measured")
    print(f"wrote {json_path} and {png_path} ({time.perf_counter() - started:.0f} s)")
    return report


def select_real(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` indices (all when fewer) drawn with `seed`, in increasing order."""
    if count >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng([int(seed), 0]).permutation(len(labels))[:count])


def diagnose(model: torch.nn.Module, real_images: np.ndarray, real_labels: np.ndarray,
             generators: Sequence[GeneratorSamples] = (), score: Score | None = None,
             settings: DiagnoseSettings = DiagnoseSettings(), realness_kind: str = DEFAULT_REALNESS,
             device: torch.device | str = "cpu", precision: str = "fp32", num_classes: int | None = None,
             real_ids: Sequence[int] | None = None) -> tuple[dict, np.ndarray]:
    """The report (JSON-ready; see REPORT_KEYS) and the PAG grid (uint8) of `model` on uint8 NCHW real
    images (held out from its training) with their labels. `real_images` are used as given: draw the
    subset with `select_real` first; `real_ids` name them in the picture's rows (default: their
    positions). Without a score the alignment section is None."""
    device = torch.device(device)
    bs = settings.batch_size
    num_classes = int(num_classes or getattr(model, "num_classes", 0) or int(real_labels.max()) + 1)
    x_real = to_float(np.ascontiguousarray(real_images)).to(device)
    y_real = torch.as_tensor(real_labels, dtype=torch.long, device=device)

    accuracy = {"clean": clean_accuracy(model, x_real, y_real, bs, precision),
                "robust": robust_accuracy(model, x_real, y_real, settings.attack_eps, settings.attack_steps,
                                          bs, precision),
                "attack": {"norm": "l2", "steps": settings.attack_steps,
                           "step_size": f"{PGD_STEP_FACTOR} * eps / steps", "random_start": False,
                           "objective": "cross-entropy (untargeted)"}}

    real_d, real_p = realness_and_prob(model, x_real, y_real, realness_kind, bs, precision)
    realness = {"kind": realness_kind, "real": {"mean_realness": float(real_d.mean()), "mean_p_y": float(real_p.mean())},
                "generators": {}}
    alignment = None
    if score is not None:
        alignment = {"score": getattr(score, "description", None), "sigmas": list(settings.sigmas),
                     "real": alignment_rows(model, score, x_real, y_real, settings.sigmas, bs, precision),
                     "generators": {}}
    for gen in generators:
        x = to_float(np.ascontiguousarray(gen.images)).to(device)
        y = torch.as_tensor(gen.labels, dtype=torch.long, device=device)
        boosted = boost_images(model, x, y, gen.method, gen.hyper, bs, precision)
        entry = {"source": gen.source, "num": int(len(x)), "method": gen.method,
                 "hyper": dataclasses.asdict(gen.hyper) if dataclasses.is_dataclass(gen.hyper) else dict(gen.hyper),
                 "mean_l2_change": float((boosted - x).flatten(1).norm(dim=1).mean().item())}
        for when, images in (("before", x), ("after", boosted)):
            d, p = realness_and_prob(model, images, y, realness_kind, bs, precision)
            entry[when] = {"auc": rank_auc(real_d, d), "mean_realness": float(d.mean()), "mean_p_y": float(p.mean()),
                           "accuracy": clean_accuracy(model, images, y, bs, precision)}
        realness["generators"][gen.name] = entry
        if score is not None:
            alignment["generators"][gen.name] = {
                when: alignment_rows(model, score, images, y, settings.sigmas, bs, precision)
                for when, images in (("before", x), ("after", boosted))}

    picks = pick_starts(real_labels, settings.pag_rows, settings.seed)
    starts = torch.cat([torch.full((1, *x_real.shape[1:]), GREY, device=device), x_real[picks]])
    targeted, prob = pag_targets(model, starts, num_classes, settings.pag_eps, settings.pag_steps, bs, precision)
    grid = pag_grid(starts.cpu(), targeted.cpu())
    ids = list(range(len(real_labels))) if real_ids is None else [int(i) for i in real_ids]
    rows = ["grey"] + [f"real {ids[i]} (label {int(real_labels[i])})" for i in picks]
    pag = {"png": PNG_NAME, "eps": settings.pag_eps, "steps": settings.pag_steps,
           "step_size": f"{PGD_STEP_FACTOR} * eps / steps", "rows": rows,
           "columns": ["start"] + [f"toward class {k}" for k in range(num_classes)],
           "target_prob": prob.tolist(),
           "mean_target_prob_grey": float(prob[0].mean()),
           "mean_target_prob_real": float(prob[1:].mean()) if len(picks) else None}

    report = {"format": FORMAT, "accuracy": accuracy, "realness": realness, "alignment": alignment, "pag": pag,
              "settings": dataclasses.asdict(settings), "num_real": int(len(x_real)), "num_classes": num_classes,
              "device": str(device), "precision": precision}
    return report, grid
