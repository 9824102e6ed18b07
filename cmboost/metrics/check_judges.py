"""The check-judges verb on files (`cmboost check-judges`, `cmboost.check_judges`): a sample file and a
dataset split in, the judge check's report out, resumable judge by judge (metrics/judge_check.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_write_text, refuse_existing, refuse_output_inside_inputs
from cmboost.files.datasets import load_dataset
from cmboost.files.samples import load_samples
from cmboost.jobs.job import check_job_folder, job_dir, remove_job_folder
from cmboost.metrics.domain_net import SHIPPED, load_domain_net
from cmboost.metrics.features import effnet_resolution
from cmboost.metrics.judge_check import (DEFAULT_ATTACKER, DEFAULT_CANDIDATES, CheckSettings, format_table,
                                         run_judge_check)
from cmboost.runtime import resolve_device


@dataclasses.dataclass(frozen=True)
class JudgeCheckRun:
    """One check-judges run, checked when built. The first `reference_count` real images of the split
    make each judge's reference, the next `num` the clean rung; `num` generated images make the mixes
    and the edits."""

    samples: str
    out: str
    judges: tuple = DEFAULT_CANDIDATES
    attacker: str = DEFAULT_ATTACKER
    data: str = "fmnist"
    split: str = "test"
    data_dir: str | None = None
    reference_count: int = 5000
    num: int = 1000
    settings: CheckSettings = CheckSettings()
    threads: int = 0            # torch CPU threads; 0: torch's choice
    device: str = "auto"        # the judges run in fp32 on it
    overwrite: bool = False

    def __post_init__(self):
        if isinstance(self.judges, str) or not all(isinstance(name, str) for name in self.judges):
            raise TypeError(f"judges: expected a sequence of judge names, got {self.judges!r}")
        if not self.judges or not all(self.judges):
            raise UserInputError("--judges: name at least one judge, with no empty name between commas")
        for name in self.judges:
            refuse_unknown_judge(name, "--judges")
        refuse_unknown_judge(self.attacker, "--attacker")
        for flag, value, low in (("--reference-count", self.reference_count, 2), ("--num", self.num, 2),
                                 ("--threads", self.threads, 0)):
            if value < low:
                raise UserInputError(f"{flag} {value}: must be >= {low}")


def refuse_unknown_judge(name: str, flag: str) -> None:
    """One line for a name that is no judge at all (a typo is an error, never an "unavailable" row):
    known are the shipped nets, inception, dinov2, effnet-lite0[@R] and a domain-net checkpoint file.
    A known judge that cannot be loaded here (no weights, no package) is the check's to report."""
    from pathlib import Path


    if name in SHIPPED or name in ("inception", "dinov2") or Path(name).is_file():
        return
    if name.startswith("effnet-lite0"):
        try:
            effnet_resolution(name)
            return
        except UserInputError:
            raise UserInputError(f"{flag} {name}: write effnet-lite0 or effnet-lite0@R with R from 32 to 512 "
                                 f"px") from None
    raise UserInputError(f"{flag} {name}: no such judge: not a shipped net ({', '.join(SHIPPED)}), inception, "
                         f"dinov2, effnet-lite0[@R], nor a checkpoint file")


def _check_inputs(run: JudgeCheckRun, real, generated, labels) -> None:
    """The samples, the real split and the counts fit each other and the attacker, before any work."""

    source = f"--samples {run.samples}"
    if labels is None:
        raise UserInputError(f"{source}: holds no class labels; the transfer edits need the classes")
    if real.shape[1:] != generated.shape[1:]:
        raise UserInputError(f"{source}: images are {'x'.join(map(str, generated.shape[1:]))} (CxHxW), but "
                             f"--data {run.data} {run.split} images are {'x'.join(map(str, real.shape[1:]))}")
    if len(real) < run.reference_count + run.num:
        raise UserInputError(f"--reference-count {run.reference_count} and --num {run.num}: need "
                             f"{run.reference_count + run.num} real images, --data {run.data} {run.split} holds "
                             f"{len(real)}")
    if len(generated) < run.num:
        raise UserInputError(f"{source}: holds {len(generated)} images; --num {run.num} are needed")
    classes = load_domain_net(run.attacker, "cpu")[0].config.num_classes
    used = np.asarray(labels[:run.num])
    if len(used) and (used.min() < 0 or used.max() >= classes):
        raise UserInputError(f"{source}: labels run from {used.min()} to {used.max()}, but the attacker "
                             f"{run.attacker} knows {classes} classes (0 to {classes - 1})")


def check_judges(run: JudgeCheckRun) -> dict:
    """Runs the judge check of `run`, writes its report to run.out and returns it; a rerun of the same
    run takes the judges it finished from its job folder (`<out>.job`)."""
    import torch


    refuse_existing(run.out, run.overwrite)
    check_job_folder(job_dir(run.out))  # one cmboost did not make is refused before any work
    refuse_output_inside_inputs(run.out, [("--samples", run.samples), ("--data-dir", run.data_dir)])
    if run.threads:
        torch.set_num_threads(run.threads)
    device = resolve_device(run.device)
    generated, labels = load_samples(run.samples)
    if labels is None:
        raise UserInputError(f"--samples {run.samples}: holds no class labels; the transfer edits need the classes")
    real, _, _ = load_dataset(run.data, run.split, run.data_dir, image_size=generated.shape[-1])
    _check_inputs(run, real, generated, labels)
    folder = job_dir(run.out)
    report = run_judge_check(list(run.judges), real, generated, labels, run.attacker, run.reference_count, run.num,
                             run.settings, device, job_folder=folder)
    report["data"].update(real=f"{run.data} {run.split}", samples=str(run.samples))
    print(format_table(report))
    atomic_write_text(run.out, json.dumps(report, indent=1) + "\n")
    remove_job_folder(folder)  # only the files the job wrote
    return report
