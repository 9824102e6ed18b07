"""The check-judges verb on files (`cmboost check-judges`, `cmboost.check_judges`): a sample file and a
dataset split in, the judge check's report out, resumable judge by judge (metrics/judge_check.py)."""

from __future__ import annotations

import dataclasses
import json

from cmboost.errors import UserInputError
from cmboost.metrics.judge_check import DEFAULT_ATTACKER, DEFAULT_CANDIDATES, CheckSettings


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
        if not self.judges or not all(self.judges):
            raise UserInputError("--judges: name at least one judge, with no empty name between commas")
        for flag, value, low in (("--reference-count", self.reference_count, 2), ("--num", self.num, 2),
                                 ("--threads", self.threads, 0)):
            if value < low:
                raise UserInputError(f"{flag} {value}: must be >= {low}")


def check_judges(run: JudgeCheckRun) -> dict:
    """Runs the judge check of `run`, writes its report to run.out and returns it; a rerun of the same
    run takes the judges it finished from its job folder (`<out>.job`)."""
    import torch

    from cmboost.atomic import atomic_write_text, refuse_existing
    from cmboost.data import load_dataset
    from cmboost.jobs import check_job_folder, job_dir, remove_job_folder
    from cmboost.metrics.judge_check import format_table, run_judge_check
    from cmboost.runtime import resolve_device
    from cmboost.samples import load_samples

    refuse_existing(run.out, run.overwrite)
    check_job_folder(job_dir(run.out))  # one cmboost did not make is refused before any work
    if run.threads:
        torch.set_num_threads(run.threads)
    device = resolve_device(run.device)
    generated, labels = load_samples(run.samples)
    if labels is None:
        raise UserInputError(f"{run.samples}: holds no class labels; the transfer edits need the classes")
    real, _, _ = load_dataset(run.data, run.split, run.data_dir, image_size=generated.shape[-1])
    folder = job_dir(run.out)
    report = run_judge_check(list(run.judges), real, generated, labels, run.attacker, run.reference_count, run.num,
                             run.settings, device, job_folder=folder)
    report["data"].update(real=f"{run.data} {run.split}", samples=str(run.samples))
    print(format_table(report))
    atomic_write_text(run.out, json.dumps(report, indent=1) + "\n")
    remove_job_folder(folder)  # only the files the job wrote
    return report
