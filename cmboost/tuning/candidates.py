"""What tune chooses among: its numbers (TuneSettings), the default grid and --grid files, each candidate
checked against the network before anything runs, and the robust radius."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cmboost.boosting.config import hyper_in_file, json_kind, json_text
from cmboost.boosting.controls import UnsharpControl
from cmboost.boosting.settings import BOOST_METHODS
from cmboost.errors import UserInputError
from cmboost.records import check_above, check_at_least, check_choice, check_finite
from cmboost.runtime import BLOCK_SIZE

GRID_FORMAT = "cmboost.grid/1"            # a --grid file; its "format" key may be left out
CONTROL_METHODS = ("unsharp",)                # tuned alike, never chosen as "the" method
CRITERIA = ("fid", "kid", "fid+kid")  # fid+kid: the worse of the two relative changes
RADIUS_METHODS = ("pgd", "bigroc")      # the candidates with an L2 radius (eps), marked beyond --robust-radius


# "Do not boost" is an answer: the candidate chosen on one half of the validation samples (the
# even-indexed images) is kept only if, on the other half (the odd-indexed ones), it lowers FID and
# KID under every tuning judge by more than ERROR_BARS paired-bootstrap standard deviations (the same
# images resampled before and after the edit), with recall kept; otherwise the file says "best": "none".
HALVES = {"choose": "even-indexed validation samples (0, 2, 4, ...)", "confirm": "odd-indexed (1, 3, 5, ...)"}
ERROR_BARS = 2.0
BOOTSTRAP_RESAMPLES = 100
BOOTSTRAP_SEED = 0
MIN_SAMPLES = 16  # 8 per half: enough for k=3 precision/recall and KID subsets, far too few for a confirmed gain


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How the winner is chosen, and the boosting batch (`cmboost tune` reads its flags' defaults
    here); checked when built, so the command line fails before it loads anything."""

    criterion: str | None = None    # what the judges minimise; None: fid with one judge, fid+kid with a committee
    max_recall_drop: float = 0.03   # candidates that lose more recall than this (vs unboosted, under any judge) are not chosen
    batch_size: int = BLOCK_SIZE    # images boosted together (the compute block, boost's --block-size)
    robust_radius: float | None = None  # the booster's robust L2 radius: PGD/BIGRoC candidates with eps beyond it are marked
    allow_beyond_radius: bool = False   # and may be chosen all the same

    def __post_init__(self):
        check_finite(self)
        check_choice(self, "criterion", CRITERIA, allow_none=True)
        if not 0 <= self.max_recall_drop <= 1:
            raise UserInputError(f"--max-recall-drop {self.max_recall_drop}: must be within [0, 1]")
        check_at_least(self, 1, ("batch_size",))
        check_above(self, 0, ("robust_radius",))

    def check_radius_known(self) -> None:
        """--allow-beyond-radius needs a radius: known once the network's recorded one has been read."""
        if self.allow_beyond_radius and self.robust_radius is None:
            raise UserInputError("--allow-beyond-radius: needs a robust radius to go beyond: --robust-radius, or "
                                 "a network that records the radius it was trained at")

    def rule(self, num_judges: int) -> str:
        """The criterion in force: the one given, else fid for one judge and fid+kid for a committee."""
        return self.criterion or ("fid" if num_judges == 1 else "fid+kid")


def default_grid(threshold: float | None, with_classifier: bool) -> list[tuple[str, dict]]:
    """The candidates: PGD radii from small to large with few and many steps, with and without the
    early stop; the released SGLD over its step size; BIGRoC radii; unsharp-mask strengths."""
    grid: list[tuple[str, dict]] = []
    for eps in (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0):
        for steps in (5, 15):
            for stop in ([None, threshold] if threshold is not None else [None]):
                grid.append(("pgd", {"eps": eps, "steps": steps, "threshold": stop}))
    for step in (0.01, 0.05, 0.2, 0.5, 1.0, 2.0):
        grid.append(("sgld", {"steps": 15, "step": step}))
    if with_classifier:
        for eps in (0.5, 1.0, 2.0, 3.0, 4.0, 6.0):
            grid.append(("bigroc", {"eps": eps, "steps": 7}))
    for amount in (0.25, 0.5, 1.0, 1.5, 2.0):
        for sigma in (0.5, 1.0):
            grid.append(("unsharp", {"amount": amount, "sigma": sigma}))
    return grid


def resolve_candidate(method: str, hyper: dict, realness_kind: str | None, where: str = "grid") -> dict:
    """The full, validated hyperparameters of one candidate, as stored in the settings file; a bad
    one is reported against `where` (the file and key it came from)."""
    if method == "unsharp":
        if not isinstance(hyper, dict):
            raise UserInputError(f"{where}: hyperparameters must be a JSON object {{name: value}}, "
                                 f"got {json_kind(hyper)}")
        names = {f.name for f in dataclasses.fields(UnsharpControl)}
        unknown = sorted(set(hyper) - names)
        if unknown:
            raise UserInputError(f"{where}: unsharp has no hyperparameter {', '.join(unknown)} "
                                 f"(it takes {', '.join(sorted(names))})")
        try:
            return dataclasses.asdict(UnsharpControl(**hyper))
        except UserInputError as err:
            raise UserInputError(f"{where}: {err}") from None
    if method == "pgd" and realness_kind is not None and isinstance(hyper, dict):
        hyper = {"realness_kind": realness_kind, **hyper}
    return dataclasses.asdict(hyper_in_file(method, hyper, where))


def read_grid(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """The candidates of a --grid file: a JSON object {method: [{hyper}, ...]} with an optional
    "format": GRID_FORMAT. Its shape is checked here, each candidate's values by `check_grid`;
    every error names the file and the key."""
    where = f"--grid {path}"
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserInputError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{where}: unreadable ({getattr(err, 'strerror', None) or err})") from None
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise UserInputError(f"{where}: not JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"{where}: expected a JSON object {{method: [{{hyper}}, ...]}}, got {json_kind(raw)}")
    fmt = raw.pop("format", GRID_FORMAT)
    if fmt != GRID_FORMAT:
        raise UserInputError(f"{where}: format {json_text(fmt)}: this cmboost reads {GRID_FORMAT}")
    grid = []
    for method, entries in raw.items():
        if method not in BOOST_METHODS + CONTROL_METHODS:
            raise UserInputError(f"{where}: method {json_text(method)}: choose one of "
                                 f"{', '.join(BOOST_METHODS + CONTROL_METHODS)}")
        if not isinstance(entries, list):
            raise UserInputError(f"{where}: {method}: expected a list of {{hyper}} objects, got {json_kind(entries)}")
        if not entries:
            raise UserInputError(f"{where}: {method}: an empty list; give it at least one candidate, or leave it out")
        grid.extend((method, hyper) for hyper in entries)
    return grid


def check_grid(grid: list[tuple[str, dict]], with_classifier: bool, realness_kind: str | None = None,
               source: str = "grid") -> list[tuple[str, dict]]:
    """The candidates resolved (see resolve_candidate), or one line naming `source` and the key: an
    empty grid, one of controls only (they are never chosen), BIGRoC without a classifier, or a
    bad value. Runs before anything is scored."""
    if not grid:
        raise UserInputError(f"{source}: holds no candidates")
    methods = [method for method, _ in grid]
    if not any(m in BOOST_METHODS for m in methods):
        raise UserInputError(f"{source}: holds only controls ({', '.join(sorted(set(methods)))}), which are never "
                             f"chosen; add at least one {', '.join(BOOST_METHODS)} candidate")
    if "bigroc" in methods and not with_classifier:
        raise UserInputError(f"{source}: bigroc candidates need a robust classifier: pass --classifier, or leave "
                             f"bigroc out of the grid")
    counts: dict[str, int] = {}
    resolved = []
    for method, hyper in grid:
        if not isinstance(method, str) or method not in BOOST_METHODS + CONTROL_METHODS:
            raise UserInputError(f"{source}: method {json_text(method)}: choose one of "
                                 f"{', '.join(BOOST_METHODS + CONTROL_METHODS)}")
        i = counts[method] = counts.get(method, -1) + 1
        resolved.append((method, resolve_candidate(method, hyper, realness_kind, f"{source}: {method}[{i}]")))
    return resolved


def beyond_radius(method: str, hyper: dict, robust_radius: float | None, mean_l2_change: float | None = None) -> bool:
    """Whether a candidate edits beyond the booster's robust radius: by its L2 radius (PGD, BIGRoC), or,
    for a boosting method without one (SGLD), by its measured mean L2 change once it has been scored."""
    if robust_radius is None:
        return False
    if method in RADIUS_METHODS:
        return hyper["eps"] > robust_radius
    return method in BOOST_METHODS and mean_l2_change is not None and mean_l2_change > robust_radius


def check_radius(candidates: list[tuple[str, dict]], choice: TuneSettings) -> None:
    """With --robust-radius (and not --allow-beyond-radius), at least one boosting candidate must be
    choosable: checked before anything is scored."""
    if choice.robust_radius is None or choice.allow_beyond_radius:
        return
    if all(beyond_radius(m, h, choice.robust_radius) for m, h in candidates if m in BOOST_METHODS):
        raise UserInputError(f"--robust-radius {choice.robust_radius}: every boosting candidate of the grid has a "
                             f"larger eps, so none could be chosen; add candidates within it (or SGLD), or pass "
                             f"--allow-beyond-radius")


def check_classifier(classifier, model, source: str = "classifier") -> None:
    """BIGRoC's classifier must read the joint network's images and classes: a mismatch is the
    classifier's fault (`source` names it), not the samples'."""
    if classifier.num_classes != model.num_classes:
        raise UserInputError(f"{source}: the classifier has {classifier.num_classes} classes, the joint network "
                             f"(--model) {model.num_classes}; BIGRoC needs a classifier over the same classes")
    if (classifier.in_channels, classifier.image_size) != (model.in_channels, model.image_size):
        raise UserInputError(f"{source}: the classifier takes {classifier.in_channels}x{classifier.image_size}x"
                             f"{classifier.image_size} images, the joint network (--model) {model.in_channels}x"
                             f"{model.image_size}x{model.image_size}")
