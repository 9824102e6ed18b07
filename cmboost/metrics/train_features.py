"""Training a domain feature network for a dataset (`cmboost train-features`, `cmboost.train_features`):
train on the train split, resumably, measure top-1 accuracy on the held-out split, save with provenance."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from cmboost.errors import UserInputError
from cmboost.files.atomic import refuse_existing, refuse_output_inside_inputs
from cmboost.files.datasets import evaluation_split, load_dataset
from cmboost.jobs.job import check_job_folder, job_dir, remove_job_folder
from cmboost.metrics.domain_net import DomainNetConfig, save_domain_net
from cmboost.metrics.domain_training import TrainSettings, classify_accuracy, config_for_data, train_domain_net
from cmboost.records import field_default
from cmboost.runtime import resolve_device, resolve_precision


@dataclasses.dataclass(frozen=True)
class FeatureTraining:
    """Everything one train-features run needs, checked when built. `settings` holds how the net is
    trained (its defaults are TrainSettings'); the rest is where data and output live and how it runs."""

    data: str
    out: str
    settings: TrainSettings = TrainSettings()
    arch: str = field_default(DomainNetConfig, "arch")
    data_dir: str | None = None
    limit: int = 0              # train on the first N images only; 0: all
    threads: int = 0            # torch CPU threads; 0: torch's choice
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False

    def __post_init__(self):
        for flag, value in (("--limit", self.limit), ("--threads", self.threads)):
            if value < 0:
                raise UserInputError(f"{flag} {value}: must be >= 0")

    def command(self) -> str:
        """The command that reproduces this run (kept in the saved net's provenance)."""
        s = self.settings
        words = ["cmboost", "train-features", "--data", self.data, "--out", str(self.out), "--epochs", str(s.epochs),
                 "--batch-size", str(s.batch_size), "--lr", repr(s.lr), "--seed", str(s.seed), "--arch", self.arch]
        if s.adv_eps:
            words += ["--adv-eps", repr(s.adv_eps), "--adv-steps", str(s.adv_steps)]
        if self.data_dir:
            words += ["--data-dir", str(self.data_dir)]
        if not s.hflip:
            words.append("--no-flip")
        if self.limit:
            words += ["--limit", str(self.limit)]
        if self.threads:
            words += ["--threads", str(self.threads)]
        words += ["--device", self.device, "--precision", self.precision]
        return " ".join(shlex.quote(w) for w in words)


def train_features(run: FeatureTraining) -> Path:
    """Trains, measures and saves the domain net of `run`; a rerun of the same run resumes per epoch
    from its job folder (`<out>.job`)."""
    import torch


    refuse_existing(run.out, run.overwrite)
    check_job_folder(job_dir(run.out))  # one cmboost did not make is refused before any work
    refuse_output_inside_inputs(run.out, [("--data", run.data.partition(":")[2] or None),
                                          ("--data-dir", run.data_dir)])
    if run.threads:
        torch.set_num_threads(run.threads)
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    images, labels, num_classes = load_dataset(run.data, "train", run.data_dir)
    if run.limit:
        images, labels = images[: run.limit], labels[: run.limit]
    config = config_for_data(images, num_classes, run.data, arch=run.arch)
    settings = run.settings
    print(f"training a domain feature net ({config.arch}, seed {settings.seed}) on {run.data} train "
          f"({len(images)} images, {config.in_channels}x{config.image_size}x{config.image_size}) on {device}, "
          f"{precision}")
    folder = job_dir(run.out)
    net = train_domain_net(images, labels, config, settings, device, precision, job_folder=folder)
    info = {"command": run.command(), "arch": config.arch, "seed": str(settings.seed),
            "data": run.data, "split": "train", "num_train": str(len(images)), "settings": settings.to_json(),
            "torch": torch.__version__}
    held_out = evaluation_split(run.data)
    try:
        if held_out is None:
            raise UserInputError("a class folder has one split only")
        test_images, test_labels, _ = load_dataset(run.data, held_out, run.data_dir)
    except UserInputError as err:
        print(f"{run.data}: no held-out split to measure accuracy on ({err})")
    else:
        accuracy = classify_accuracy(net, test_images, test_labels, device=device)
        info.update(test_split=held_out, test_accuracy=f"{accuracy:.4f}")
        print(f"{held_out} accuracy: {accuracy:.4f} ({len(test_images)} images)")
    path = save_domain_net(run.out, net, info, overwrite=run.overwrite)
    remove_job_folder(folder)  # only the files the job wrote
    print(f"wrote {run.out}")
    return path
