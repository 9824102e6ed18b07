"""The tune verb on files (`cmboost tune`, `cmboost.tune`): validation samples, a joint network and the
tuning judges' training-data references in, the settings file out, resumable candidate by candidate
(the scoring and the choice are tuning/choose.py's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cmboost.boosting.boost import resolve_threshold, trained_radius, trained_realness_kind
from cmboost.boosting.config import DEFAULT_REALNESS
from cmboost.errors import UserInputError
from cmboost.files.atomic import refuse_output_inside_inputs
from cmboost.jcd.model import load_joint_model
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.judges import TUNING_JUDGE, refuse_reporting_name
from cmboost.metrics.reference import load_reference
from cmboost.runtime import resolve_device, resolve_precision
from cmboost.tuning.candidates import TuneSettings, check_grid, check_radius, read_grid
from cmboost.tuning.choose import ResolvedTune, run_tune


@dataclasses.dataclass(frozen=True)
class TuneRun:
    """One `cmboost tune` (and `cmboost.tune`) run on files, checked when built: validation samples,
    the joint network, one training-data reference per tuning judge (in `judges`' order), and how the
    winner is chosen."""

    samples: str
    model: str
    refs: tuple
    out: str
    judges: tuple = (TUNING_JUDGE,)    # the tuning judge, or a committee of them
    classifier: str | None = None      # a robust classifier for the BIGRoC candidates
    threshold_from: str | None = None  # held-out real images: adds PGD candidates with early stop
    grid: str | None = None            # a JSON grid replacing the default candidates
    choice: TuneSettings = TuneSettings()  # its robust radius, when None: the network's, if it records one
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if len(self.refs) != len(self.judges):
            raise UserInputError(f"--ref: {len(self.judges)} judge{'s' if len(self.judges) > 1 else ''} (--judge "
                                 f"{','.join(self.judges)}) need one reference each, in the same order; got "
                                 f"{len(self.refs)} ({', '.join(map(str, self.refs))})")
        for name in self.judges:  # the commonest mistake fails before anything is loaded; run_tune checks weights
            refuse_reporting_name(name)

    def resolved_choice(self) -> tuple[TuneSettings, str | None]:
        """How the winner is chosen, with the robust radius resolved, and where that radius came from."""

        choice, radius_from = self.choice, "--robust-radius" if self.choice.robust_radius is not None else None
        if radius_from is None and Path(self.model).is_file():
            # Unless told otherwise, a train-jcd network's robust radius is the one it was adversarially trained at.
            radius = trained_radius(self.model)
            if radius is not None:
                choice = dataclasses.replace(choice, robust_radius=radius)
                radius_from = "the network's training attack (train-jcd --real-eps)"
        return choice, radius_from  # ResolvedTune checks that a radius is known where one is needed


def resolve_tune(run: TuneRun) -> ResolvedTune:
    """The run's inputs read and loaded: the robust radius resolved, a --grid file read and checked, the
    output refused inside the inputs, the networks, judges and references loaded, the early-stop
    threshold measured. What needs the loaded objects is checked by run_tune."""
    choice, radius_from = run.resolved_choice()
    grid = None
    if run.grid:  # the file's shape and every candidate are checked before anything is loaded
        grid = read_grid(run.grid)
        check_radius(check_grid(grid, run.classifier is not None, source=f"--grid {run.grid}"), choice)
    refuse_output_inside_inputs(run.out, [("the samples", run.samples), ("--threshold-from", run.threshold_from)])
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    model = load_joint_model(run.model).to(device)
    kind = trained_realness_kind(run.model) or DEFAULT_REALNESS
    threshold = resolve_threshold(model, None, run.threshold_from, kind, device, precision) \
        if run.threshold_from else None
    refs = list(map(str, run.refs))
    provenance = {"samples": run.samples, "model": run.model, "classifier": run.classifier,
                  "threshold_from": run.threshold_from, "threshold": threshold,
                  "reference": refs[0] if len(refs) == 1 else refs, "robust_radius_from": radius_from}
    return ResolvedTune(
        samples=run.samples, out=run.out, model=model,
        judges=tuple(load_feature_extractor(name, device) for name in run.judges),
        references=tuple(load_reference(ref) for ref in run.refs),
        classifier=load_joint_model(run.classifier).to(device) if run.classifier else None,
        threshold=threshold, grid=None if grid is None else tuple(grid), realness_kind=kind, choice=choice,
        device=device, precision=precision, provenance=provenance, overwrite=run.overwrite, progress=run.progress,
        grid_source=f"--grid {run.grid}" if run.grid else "grid", classifier_source=f"--classifier {run.classifier}")


def tune_files(run: TuneRun) -> dict:
    """Tunes from files (the settings file is written to run.out and returned); a rerun resumes."""
    return run_tune(resolve_tune(run))
