"""What the demo runs: its options, the generators and seeds, each boosting method and control (a key, and
a label for display), the panel of judges and the rows a resumed run may reuse."""

from __future__ import annotations

import dataclasses

from cmboost.errors import UserInputError
from cmboost.metrics.judge_check import passing
from cmboost.metrics.judges import REPORTING_JUDGES

HEADLINE = ("ct1", "cd1")
NAMES = {"ct": "CT", "cd": "CD"}
METRICS = ("fid", "kid", "kid_std", "is", "precision", "recall")


# The tuning judge may prefer almost no sharpening; the classic strength is kept as a second control,
# chosen by no judge, since reporting judges can reward sharpening that the tuning judge does not.
STANDARD_UNSHARP = {"amount": 1.0, "sigma": 1.0}


# Controls that edit each image by the L2 norm of its joint-PGD edit: in a random direction, or along
# the attacker's class evidence (a plain classifier's adversarial edit, PGD with this many steps).
CONTROL_EDITS = ("random", "plain")
PLAIN_CONTROL_STEPS = 10


# The panel's verdict pairs each method's images with the same images unboosted (and with the plain
# control's): FID and KID on this many resamplings of the images, the same rows for every set of one
# seed (ReferenceStatistics.bootstrap). 50 resamples estimate a std to about 10%.
PAIRED_RESAMPLES = 50


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    out_dir: str = "demo-out"
    quick: bool = False     # a few dozen images per row: an end-to-end check (the tests)
    full: bool = False      # 1000 images per row; the default is the "standard" size
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False  # run again from scratch over an existing report or cache
    progress: bool = True

    def __post_init__(self):
        if self.quick and self.full:
            raise UserInputError("--quick and --full: choose one")
        if self.threads is not None and self.threads < 0:
            raise UserInputError(f"--threads {self.threads}: must be >= 0 (0: torch's choice)")

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full" if self.full else "standard"


@dataclasses.dataclass(frozen=True)
class Method:
    """One boosting column of the headline table. `key` identifies it (rows, verdicts and tune files'
    method names use it); `label` is only what the report prints. `network` is "booster" (the shipped booster), a
    checkpoint name, or None; `hyper` says where the hyperparameters come from: "tuned" (the tune
    file's choice for the boosting method `tuned_as`), "tuned control" (the tune file's entry for the
    control `tuned_as`), "standard" (STANDARD_UNSHARP) or None."""

    key: str
    label: str
    network: str | None
    method: str | None
    hyper: str | None
    tuned_as: str | None = None
    control: bool = False   # a control: not repeated on the 2-step generators
    grid: bool = False      # the labelled before/after grid of the first seed
    paired: bool = False    # its headline rows keep the bootstrap the panel's paired verdict reads


# The headline's methods, in the report's order. The random and plain-classifier controls edit each
# image by the L2 norm of its joint-PGD edit, so they take PGD's tuned hyperparameters.
METHODS = (
    Method("none", "none", None, None, None, paired=True),
    Method("unsharp-tuned", "unsharp mask, tuned (control)", None, "unsharp", "tuned control", "unsharp", control=True),
    Method("unsharp-standard", "unsharp mask, amount 1 (control)", None, "unsharp", "standard", control=True),
    Method("random", "random, PGD's L2 (control)", "booster", "random", "tuned", "pgd", control=True),
    Method("plain", "plain classifier, PGD's L2 (control)", "booster", "plain", "tuned", "pgd", control=True,
           paired=True),
    Method("bigroc", "classifier-only (BIGRoC)", "jcd-ce", "bigroc", "tuned", "bigroc"),
    Method("pgd", "joint (PGD)", "booster", "pgd", "tuned", "pgd", grid=True, paired=True),
    Method("sgld", "joint (SGLD)", "booster", "sgld", "tuned", "sgld", paired=True),
)
LABELS = {m.key: m.label for m in METHODS}
# Reports written before rows carried their method's key (the committed ones among them) are read by label.
KEY_OF_LABEL = {m.label: m.key for m in METHODS}
JOINT_METHODS = ("pgd", "sgld")    # the joint network's methods, whose verdicts the report gives
PLAIN_CONTROL = "plain"
RIVALS = ("bigroc", "unsharp-tuned", "unsharp-standard", "random", PLAIN_CONTROL)  # what a joint method must beat


def method_key(entry: dict) -> str:
    """The key of the method of a report entry: a headline or summary row (its label in "boost"), or a
    paired change or panel verdict (its label in "method")."""
    return entry.get("key") or KEY_OF_LABEL[entry["boost"] if "boost" in entry else entry["method"]]


OBJECTIVE_NETWORKS = ("ce", "bce", "ce+bce", "joint")  # the paper's Table 2: jcd-<objective>, width 16
FRONTIER_STEPS = (1, 2, 3)  # generator steps on the frontier


def tune_answer(settings: dict) -> dict:
    """What a shipped tune file answers to "should I boost these samples?": the method confirmed on the
    committee's confirming half with its changes there, or "none" with the reason."""
    decision = settings.get("decision")
    if decision is None:
        return {"best": settings["best"], "reason": "tuned before tune confirmed its choice on held-back samples",
                "judges": {}}
    return {"best": decision["best"], "reason": decision["reason"],
            "judges": {name: {metric: judge[metric] for metric in ("fid", "kid")}
                       for name, judge in decision["judges"].items()}}


def choose_panel(check: dict, excluded: list[str]) -> list[str]:
    """The reporting candidates that passed, less the tuning judge(s) and the attacker."""
    return [name for name in passing(check, excluded) if name in REPORTING_JUDGES]


def demo_row_problem(key: str, row) -> str | None:
    """What is wrong with a cached row of the demo's rows.json (None when whole): each row holds every
    judge's METRICS and the mean L2 change that the report reads."""
    if not isinstance(row, dict) or not isinstance(row.get("judges"), dict) or not row["judges"]:
        return "expected an object with the judges' metrics"
    if not isinstance(row.get("mean_l2_change"), (int, float)):
        return "mean_l2_change: missing or not a number"
    for name, metrics in row["judges"].items():
        if not isinstance(metrics, dict) or not isinstance(metrics.get("fid"), (int, float)) or \
                any(k not in metrics for k in METRICS):
            return f"judges.{name}: expected {', '.join(METRICS)}"
    return None
