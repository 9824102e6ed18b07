"""Choosing the boosting method and its settings for one generator and one joint network.

Every candidate (a method and its hyperparameters) boosts the same validation samples; the tuning
judge scores the result against statistics of *training* data. The lowest FID wins among the
candidates that keep recall within `max_recall_drop` of the unboosted samples, per method and
overall. The reporting judges and the test split take no part: that is what lets a report made
with them be trusted (see cmboost/metrics/judges.py).

A committee of tuning judges (`--judge a,b,c`, one training-data reference each) guards against a
setting that fits one judge: the candidate chosen is the one whose worst relative FID and KID change
(vs the unboosted samples, per judge) across the committee is lowest, among those that keep recall
under every judge. Every judge's metrics of every candidate are recorded, with how well the judges
agree on the ranking of the candidates (Spearman's rho of their FIDs on the validation samples).
With one judge the rule and the file are as they always were.

Candidates that edit beyond the booster's robust radius (`--robust-radius`: PGD and BIGRoC with a
larger eps, SGLD with a larger measured mean L2 change) are marked, and not chosen unless `--allow-beyond-radius`.

The unsharp-mask control is tuned on the same footing, so the report compares the method with
the best sharpening, not with an arbitrary one. Each finished candidate is cached in the run's
`jobs.Job` (`<out>.job`), so rerunning an interrupted tune resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmboost.files.atomic import atomic_write_text
from cmboost.boosting.methods import boost_with
from cmboost.boosting.config import hyper_in_file, json_kind, json_text, make_hyper
from cmboost.boosting.controls import UnsharpControl, l2_change, unsharp_mask
from cmboost.files.samples import load_samples, to_float, to_uint8
from cmboost.files.atomic import refuse_existing
from cmboost.errors import UserInputError
from cmboost.jobs.job import ROWS_FILE, Job, job_dir
from cmboost.metrics.stats import feature_statistics
from cmboost.records import check_above, check_at_least, check_choice, check_finite, field_default
from cmboost.runtime import BLOCK_SIZE
from cmboost.boosting.boost import check_fits_model
from cmboost.files.checkpoints import weights_digest
from cmboost.metrics.evaluate import evaluate_images, prepared_statistics
from cmboost.metrics.judge_check import pool_features
from cmboost.metrics.separation import check_tuning_committee
from cmboost.boosting.settings import BOOST_METHODS, DO_NOT_BOOST, FORMAT

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


def apply_method(method: str, hyper: dict, model, classifier, images: torch.Tensor, labels: torch.Tensor,
                 indices: Sequence[int], precision: str = "fp32") -> torch.Tensor:
    """One candidate on one batch of float images: a boosting method or a control."""
    if method == "unsharp":
        return unsharp_mask(images, UnsharpControl(**hyper))
    net = classifier if method == "bigroc" else model
    if net is None:
        raise UserInputError("bigroc candidates need a classifier (--classifier)")
    return boost_with(net, images, labels, method, make_hyper(method, **hyper), indices, precision)


def run_method(method: str, hyper: dict, model, classifier, images_u8: np.ndarray, labels: np.ndarray,
               device, batch_size: int = field_default(TuneSettings, "batch_size"),
               precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, per-image L2 change in [0, 1] units) of a whole sample array."""
    out, change = [], []
    for start in range(0, len(images_u8), batch_size):
        x = to_float(images_u8[start:start + batch_size]).to(device)
        y = torch.as_tensor(labels[start:start + batch_size], device=device)
        boosted = apply_method(method, hyper, model, classifier, x, y, range(start, start + len(x)), precision)
        quantised = to_uint8(boosted)
        change.append(l2_change(x, to_float(quantised).to(device)).cpu().numpy())
        out.append(quantised)
    return np.concatenate(out), np.concatenate(change)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def relative_change(value: float, base: float) -> float:
    """(value - base) / |base|: the change against the unboosted samples, in the base's own units,
    so judges of different scales weigh alike (rising with `value` whatever the base's sign; the
    plain difference when the base is 0)."""
    return (value - base) / abs(base) if base else value - base


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


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties take their mean rank); None where it is undefined: fewer
    than two values, or one side all alike."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def ranking_agreement(rows: list[dict], names: list[str]) -> dict:
    """How alike the committee ranks the candidates (every tuned one, not the unboosted samples) by
    FID on the validation samples: Spearman's rho per pair of judges, and each judge's mean over its pairs."""
    fids = {n: [r["judges"][n]["fid"] for r in rows] for n in names}
    pairs = [{"judges": [a, b], "rho": spearman(fids[a], fids[b])}
             for i, a in enumerate(names) for b in names[i + 1:]]
    mean = {}
    for n in names:
        mine = [p["rho"] for p in pairs if n in p["judges"] and p["rho"] is not None]
        mean[n] = float(np.mean(mine)) if mine else None
    return {"statistic": "Spearman rank correlation of the candidates' FID, on the validation samples",
            "candidates": len(rows), "pairs": pairs, "mean": mean}


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


def as_committee(judge, reference) -> tuple[list, list]:
    """(judges, references): one of each, or lists of equal length (a committee, references in the
    judges' order)."""
    judges = list(judge) if isinstance(judge, (list, tuple)) else [judge]
    references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if not judges:
        raise UserInputError("--judge: names no judge")
    if len(references) != len(judges):
        raise UserInputError(f"--ref: {len(judges)} judge{'s' if len(judges) > 1 else ''} need one reference each, "
                             f"given in --judge's order, and got {len(references)}")
    return judges, references


def tune(samples: str | os.PathLike, model, reference, judge, out: str | os.PathLike, classifier=None,
         threshold: float | None = None, grid: list[tuple[str, dict]] | None = None,
         criterion: str | None = field_default(TuneSettings, "criterion"),
         max_recall_drop: float = field_default(TuneSettings, "max_recall_drop"), realness_kind: str | None = None,
         device: torch.device | str = "cpu", precision: str = "fp32",
         batch_size: int = field_default(TuneSettings, "batch_size"), provenance: dict | None = None,
         overwrite: bool = False, progress: bool = True, grid_source: str = "grid",
         classifier_source: str = "classifier",
         robust_radius: float | None = field_default(TuneSettings, "robust_radius"),
         allow_beyond_radius: bool = field_default(TuneSettings, "allow_beyond_radius")) -> dict:
    """Scores every candidate on `samples` with `judge` (a tuning judge) against `reference`
    (training-data statistics made by that judge), writes the settings file `out`, returns it.

    `judge` may be a list, a committee of tuning judges, with `reference` the list of their
    references in the same order: then the chosen candidate is the one whose worst relative change
    (vs the unboosted samples, per judge) of FID and KID across the committee is lowest, among those
    that keep recall under every judge; each judge's metrics of every candidate are recorded, with
    the judges' agreement on the ranking (`ranking_agreement`)."""

    choice = TuneSettings(criterion, max_recall_drop, batch_size, robust_radius, allow_beyond_radius)
    choice.check_radius_known()
    judges, references = as_committee(judge, reference)  # bad values fail before any work
    check_tuning_committee(judges)
    for ref, one in zip(references, judges):
        ref.check_against(one)
        if "test" in str(ref.data).lower().split():
            raise UserInputError(f"{ref.source}: made from a test split ({ref.data}); tune against training data "
                                 "(cmboost evaluate-ref --split train) and keep the test split for the report")
    names = [j.name for j in judges]
    committee = len(judges) > 1
    out = Path(out)
    refuse_existing(out, overwrite)
    images, labels = load_samples(samples, num_classes=model.num_classes)
    if labels is None:
        raise UserInputError(f"{samples}: has no labels (arr_1); tuning boosts each image towards its label")
    if len(images) < MIN_SAMPLES:
        raise UserInputError(f"{samples}: {len(images)} images; tuning needs at least {MIN_SAMPLES}, half to choose "
                             f"on and half to confirm on (a few hundred give error bars that can exclude noise)")
    if classifier is not None:
        check_classifier(classifier, model, classifier_source)
    check_fits_model(images, labels, model, str(samples))
    if classifier is not None:
        check_fits_model(images, labels, classifier, str(samples))
    grid = default_grid(threshold, classifier is not None) if grid is None else grid
    candidates = check_grid(grid, classifier is not None, realness_kind, grid_source)
    check_radius(candidates, choice)
    fingerprint = {"samples": _digest(images), "labels": _digest(labels), "model": weights_digest(model),
                   "classifier": weights_digest(classifier) if classifier is not None else None,
                   "judge": [j.identity for j in judges] if committee else judges[0].identity,
                   "reference": [_digest(r.mu) for r in references] if committee else _digest(references[0].mu),
                   "precision": precision,
                   "batch_size": batch_size,  # the compute block: a resume must boost with the same one
                   "halves": "even/odd"}  # rows scored on both halves; a job of whole-set rows cannot resume
    keys = ["none"] + [json.dumps([m, h], sort_keys=True) for m, h in candidates]
    with Job(job_dir(out), fingerprint, restart=overwrite) as job:
        done = _finished_rows(job, keys, names if committee else None)
        settings = _score_and_choose(job, done, keys, images, labels, model, classifier, judges, references, choice,
                                     device, precision, progress, provenance, fingerprint)
        atomic_write_text(out, json.dumps(settings, indent=1))
        job.finish()
    return settings


def _score_and_choose(job: Job, done: dict, keys: list[str], images, labels, model, classifier, judges, references,
                      choice: "TuneSettings", device, precision: str, progress: bool, provenance: dict | None,
                      fingerprint: dict) -> dict:
    """Scores the candidates not yet in `done` (each cached in the job as it finishes), then chooses."""
    from tqdm import tqdm


    names = [j.name for j in judges]
    committee = len(judges) > 1
    rule = choice.rule(len(judges))
    plain = not committee and rule in ("fid", "kid")  # one judge, one metric: today's rule and file layout
    batch_size, max_recall_drop = choice.batch_size, choice.max_recall_drop
    robust_radius, allow_beyond_radius = choice.robust_radius, choice.allow_beyond_radius

    def score(images_u8: np.ndarray) -> dict:
        """The choosing half's metrics (what the choice reads), and the confirming half's under "confirm"."""
        halves = {}
        for half, rows in zip(HALVES, split_halves(len(images_u8))):
            per = {}
            for one, ref in zip(judges, references):
                result = evaluate_images(images_u8[rows], ref, one)
                per[one.name] = {k: result[k] for k in METRIC_KEYS}
            # With a committee, "metrics" stays the first judge's, as with one judge.
            halves[half] = {"metrics": per[names[0]], "judges": per} if committee else {"metrics": per[names[0]]}
        return {**halves["choose"], "confirm": halves["confirm"]}

    bar = tqdm(total=len(keys), desc="tune", unit="candidate", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, initial=sum(k in done for k in keys))
    with bar:
        for key in keys:
            if key in done:
                continue
            t0 = time.perf_counter()
            if key == "none":
                row = {"method": "none", "hyper": {}, **score(images), "mean_l2_change": 0.0}
            else:
                method, hyper = json.loads(key)
                boosted, change = run_method(method, hyper, model, classifier, images, labels, device,
                                             batch_size, precision)
                row = {"method": method, "hyper": hyper, **score(boosted), "mean_l2_change": float(change.mean())}
            # As a resume reads it back (keys sorted), and no timings: the same bytes on every run and resume.
            done[key] = job.put_row(key, json.loads(json.dumps(row, sort_keys=True)))
            bar.set_postfix_str(f"last {time.perf_counter() - t0:.1f} s", refresh=False)
            bar.update(1)

    rows = [dict(done[k]) for k in keys]
    per_judge = (lambda row: row["judges"]) if committee else (lambda row: {names[0]: row["metrics"]})
    base = per_judge(rows[0])
    measured = ("fid", "kid") if rule == "fid+kid" else (rule,)
    for row in rows:
        per = per_judge(row)
        recall_ok = all(per[n]["recall"] >= base[n]["recall"] - max_recall_drop for n in names)
        if plain:
            row["_score"], row["_recall_ok"] = per[names[0]][rule], recall_ok
        else:
            row["change"] = {n: {c: relative_change(per[n][c], base[n][c]) for c in ("fid", "kid")} for n in names}
            row["worst"] = max(row["change"][n][c] for n in names for c in measured)
            row["recall_ok"] = row["_recall_ok"] = recall_ok
            row["_score"] = row["worst"]
        if robust_radius is not None:
            row["beyond_radius"] = beyond_radius(row["method"], row["hyper"], robust_radius, row["mean_l2_change"])

    def key(row: dict) -> tuple:  # within the radius (unless allowed), then recall kept, then the score
        return (bool(row.get("beyond_radius")) and not allow_beyond_radius, not row["_recall_ok"], row["_score"])

    methods = {}
    for method in BOOST_METHODS + CONTROL_METHODS:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            best = min(mine, key=key)
            methods[method] = dict(best, recall_ok=best["_recall_ok"])
    chosen = min((m for m in BOOST_METHODS if m in methods), key=lambda m: key(methods[m]))
    if methods[chosen].get("beyond_radius") and not allow_beyond_radius:
        # only SGLD's measured edits can bring this about (check_radius ruled out the rest before scoring)
        raise UserInputError(f"--robust-radius {robust_radius}: every boosting candidate edits beyond it (SGLD by "
                             f"its measured mean L2 change), so none can be chosen; add smaller candidates, or "
                             f"pass --allow-beyond-radius (the scores are kept in {job.folder}: a rerun resumes)")
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("_")}  # noqa: E731
    rows, methods = [strip(r) for r in rows], {m: strip(r) for m, r in methods.items()}
    for method, best in methods.items():  # each method's best, measured again on the confirming half
        best["confirm_change"] = confirm_change(best, images, labels, model, classifier, judges, references,
                                                device, batch_size, precision)
    decision = decide(chosen, methods[chosen], rows[0], names, max_recall_drop)

    settings = {"format": FORMAT, "best": decision["best"], "choice": chosen, "decision": decision,
                "criterion": rule, "max_recall_drop": max_recall_drop}
    if robust_radius is not None:
        settings.update(robust_radius=robust_radius, allow_beyond_radius=allow_beyond_radius)
    settings["judge"] = {"name": names[0], "identity": judges[0].identity, "role": "tuning"}
    if committee:
        settings["committee"] = [{"name": j.name, "identity": j.identity, "role": "tuning",
                                  "reference": {"source": str(r.source), "data": str(r.data)}}
                                 for j, r in zip(judges, references)]
        settings["rule"] = (f"lowest worst relative change (vs unboosted, per judge) of "
                            f"{' and '.join(c.upper() for c in measured)} across the committee, among the "
                            f"candidates that keep recall within max_recall_drop under every judge")
    settings.update({"reference": {"source": str(references[0].source), "data": str(references[0].data)},
                     "fingerprint": fingerprint, "provenance": provenance or {}, "unboosted": rows[0]["metrics"],
                     "methods": methods, "candidates": rows})
    if committee:
        settings["agreement"] = ranking_agreement(rows[1:], names)
    return settings


METRIC_KEYS = ("fid", "kid", "kid_std", "is", "precision", "recall")


def split_halves(count: int) -> tuple[np.ndarray, np.ndarray]:
    """(choosing rows, confirming rows): even and odd indices, so that samples ordered by class or
    seed fall into both halves alike."""
    return np.arange(0, count, 2), np.arange(1, count, 2)


def confirm_change(best: dict, images: np.ndarray, labels: np.ndarray, model, classifier, judges, references,
                   device, batch_size: int, precision: str) -> dict:
    """Per judge, the change of FID and KID that candidate `best` makes on the confirming half, with
    its paired-bootstrap std, in the judge's units and relative to the unboosted half. The candidate's
    images are made again (boosting is deterministic), so a resumed tune needs no cached images."""

    rows = split_halves(len(images))[1]
    boosted, _ = run_method(best["method"], best["hyper"], model, classifier, images, labels, device, batch_size,
                            precision)
    out = {}
    for judge, ref in zip(judges, references):
        before, after = pool_features(judge, images[rows]), pool_features(judge, boosted[rows])
        unboosted = prepared_statistics(ref, ref.features)
        paired = unboosted.paired_bootstrap(before, after, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        base = {"fid": unboosted.fid(*feature_statistics(before), rows=before if len(before) <= before.shape[1] else None),
                "kid": unboosted.kid(before)[0]}
        out[judge.name] = {metric: {**paired[metric], "base": base[metric],
                                    "relative": relative_change(base[metric] + paired[metric]["change"], base[metric]),
                                    "relative_std": paired[metric]["std"] / abs(base[metric]) if base[metric] else None,
                                    "beyond_noise": paired[metric]["change"] < -ERROR_BARS * paired[metric]["std"]}
                           for metric in ("fid", "kid")}
    return out


def decide(chosen: str, best: dict, unboosted: dict, names: list[str], max_recall_drop: float) -> dict:
    """The answer: the method chosen on the choosing half if, on the confirming half, it lowers FID and
    KID under every judge by more than ERROR_BARS paired-bootstrap stds and keeps recall within
    `max_recall_drop` of the unboosted half; else DO_NOT_BOOST, with the reason and the numbers."""
    per_judge = lambda row: row["confirm"].get("judges") or {names[0]: row["confirm"]["metrics"]}  # noqa: E731
    after, before = per_judge(best), per_judge(unboosted)
    failures, judges = [], {}
    for name in names:
        change = best["confirm_change"][name]
        recall_kept = after[name]["recall"] >= before[name]["recall"] - max_recall_drop
        judges[name] = {"fid": change["fid"], "kid": change["kid"], "recall_before": before[name]["recall"],
                        "recall_after": after[name]["recall"], "recall_kept": recall_kept,
                        "confirmed": recall_kept and change["fid"]["beyond_noise"] and change["kid"]["beyond_noise"]}
        for metric in ("fid", "kid"):
            if not change[metric]["beyond_noise"]:
                failures.append(f"{name} {metric.upper()} {100 * change[metric]['relative']:+.1f}% "
                                f"(change {change[metric]['change']:+.4g}, {ERROR_BARS:g} std = "
                                f"{ERROR_BARS * change[metric]['std']:.4g})")
        if not recall_kept:
            failures.append(f"{name} recall {before[name]['recall']:.3f} -> {after[name]['recall']:.3f}")
    confirmed = not failures
    label = f"{chosen} {json.dumps(best['hyper'], sort_keys=True)}"
    reason = (f"{label}, chosen on the choosing half, lowers FID and KID beyond {ERROR_BARS:g} paired-bootstrap "
              f"stds on the confirming half under every judge, recall kept" if confirmed else
              f"{label}, the best on the choosing half, is not confirmed on the other half: "
              + "; ".join(failures))
    return {"best": chosen if confirmed else DO_NOT_BOOST, "candidate": {"method": chosen, "hyper": best["hyper"]},
            "reason": reason, "halves": HALVES, "error_bars": ERROR_BARS, "resamples": BOOTSTRAP_RESAMPLES,
            "judges": judges}


def _finished_rows(job: Job, keys: list[str], names: list[str] | None = None) -> dict[str, dict]:
    """The job's finished rows among `keys`, schema-checked: a row of another shape is named with its
    fix, never half-read. `names`: a committee's judges, whose metrics each row must hold."""
    where = job.folder / ROWS_FILE
    fresh = f"delete {job.folder} to start over"
    done = {}
    for key in keys:
        if key in job.rows:
            _check_row(job.rows[key], f"{where}: {json_text(key)}", fresh, names)
            done[key] = job.rows[key]
    return done


def _check_metrics(metrics, where: str, fresh: str) -> None:
    def number(value, nullable=False) -> bool:
        return (value is None and nullable) or (isinstance(value, (int, float)) and not isinstance(value, bool))

    if not isinstance(metrics, dict) or not all(number(metrics.get(k), k not in ("fid", "recall")) for k in METRIC_KEYS):
        raise UserInputError(f"{where}: expected numbers for {', '.join(METRIC_KEYS)}; {fresh}")


def _check_half(half: dict, where: str, fresh: str, names: list[str] | None) -> None:
    """One half's scores in a row: its lead judge's metrics, and with a committee each judge's."""
    _check_metrics(half.get("metrics"), f"{where}: metrics", fresh)
    if names is not None:
        per = half.get("judges")
        if not isinstance(per, dict) or set(per) != set(names):
            raise UserInputError(f"{where}: judges: expected the metrics of each of {', '.join(names)}; {fresh}")
        for name in names:
            _check_metrics(per[name], f"{where}: judges[{json_text(name)}]", fresh)


def _check_row(row, where: str, fresh: str, names: list[str] | None = None) -> None:
    if not isinstance(row, dict):
        raise UserInputError(f"{where}: expected an object, got {json_kind(row)}; {fresh}")
    if not isinstance(row.get("method"), str) or not isinstance(row.get("hyper"), dict):
        raise UserInputError(f"{where}: needs a method (string) and hyper (object); {fresh}")
    _check_half(row, where, fresh, names)
    confirm = row.get("confirm")
    if not isinstance(confirm, dict):
        raise UserInputError(f"{where}: confirm: expected the confirming half's metrics; {fresh}")
    _check_half(confirm, f"{where}: confirm", fresh, names)
    if not isinstance(row.get("mean_l2_change"), (int, float)) or isinstance(row.get("mean_l2_change"), bool):
        raise UserInputError(f"{where}: mean_l2_change: expected a number; {fresh}")


def _mark(settings: dict, method: str, best: dict) -> str:
    marks = []
    if method == settings.get("choice", settings["best"]):
        marks.append("chosen" if settings["best"] == method else "chosen, not confirmed")
    elif not best["recall_ok"]:
        marks.append("recall drops")
    if best.get("beyond_radius"):
        marks.append(f"{'eps' if 'eps' in best['hyper'] else 'edit'} beyond the robust radius {settings['robust_radius']}")
    return f" ({'; '.join(marks)})" if marks else ""


def _confirm_lines(settings: dict) -> list[str]:
    """Each method's best on the confirming half: the change of FID and KID per judge, +- its
    paired-bootstrap std, marked * beyond the noise (ERROR_BARS stds); then the answer and why."""
    decision = settings.get("decision")
    if decision is None:  # a file written before tune confirmed its choice
        return []
    names = [m["name"] for m in settings.get("committee", [settings["judge"]])]
    lines = [f"confirming half ({decision['halves']['confirm']}): change vs unboosted +- paired-bootstrap std "
             f"({decision['resamples']} resamples); * lowers it by more than {decision['error_bars']:g} std"]
    head = f"{'method':<9}"
    for i in range(1, len(names) + 1):
        head += f" {f'FID{i}':>16} {f'KID{i}':>16}"
    lines.append(head)

    def shown(change: dict) -> str:
        star = "*" if change["beyond_noise"] else " "
        spread = "n/a" if change["relative_std"] is None else f"{100 * change['relative_std']:.1f}"
        return f"{100 * change['relative']:+6.1f}+-{spread:>5}%{star}"

    for method, best in settings["methods"].items():
        if "confirm_change" in best:
            line = f"{method:<9}"
            for name in names:
                line += f" {shown(best['confirm_change'][name]['fid']):>16} {shown(best['confirm_change'][name]['kid']):>16}"
            lines.append(line)
    answer = "do not boost" if decision["best"] == DO_NOT_BOOST else f"boost with {decision['best']}"
    lines.append(f"answer: {answer}: {decision['reason']}")
    return lines


def _radius_lines(settings: dict) -> list[str]:
    """The candidates beyond the robust radius, if one was given."""
    if settings.get("robust_radius") is None:
        return []
    beyond = [c for c in settings["candidates"] if c.get("beyond_radius")]
    tuned = len(settings["candidates"]) - 1
    what = "marked, and may be chosen" if settings.get("allow_beyond_radius") else "marked, never chosen"
    listed = "; ".join(f"{c['method']} eps {c['hyper']['eps']:g} steps {c['hyper'].get('steps')}" if "eps" in c["hyper"]
                       else f"{c['method']} step {c['hyper'].get('step')} (mean L2 change {c['mean_l2_change']:.2f})"
                       for c in beyond)
    return [f"robust radius {settings['robust_radius']:g}: {len(beyond)} of {tuned} candidates edit beyond it "
            f"({what}){': ' + listed if listed else ''}"]


def format_table(settings: dict) -> str:
    """One line per method's best setting, then the unboosted row, under the tuning judge; with a
    committee, each judge's relative changes and the judges' ranking agreement."""
    if "committee" in settings:
        return _committee_table(settings)
    crit = settings["criterion"]
    what = f"lowest {crit.upper()}" if crit in ("fid", "kid") else "lowest worst relative change of FID and KID"
    lines = [f"tuning judge: {settings['judge']['name']} ({settings['judge']['identity']}); reference: "
             f"{settings['reference']['data']}; criterion: {what} with recall within "
             f"{settings['max_recall_drop']} of unboosted",
             f"{'method':<9} {'FID':>8} {'KID x1e3':>9} {'recall':>7} {'L2 change':>9}  settings"]
    base = settings["unboosted"]
    lines.append(f"{'none':<9} {base['fid']:8.3f} {1e3 * base['kid']:9.3f} {base['recall']:7.3f} {0.0:9.3f}")
    for method, best in settings["methods"].items():
        m = best["metrics"]
        lines.append(f"{method:<9} {m['fid']:8.3f} {1e3 * m['kid']:9.3f} {m['recall']:7.3f} "
                     f"{best['mean_l2_change']:9.3f}  {json.dumps(best['hyper'], sort_keys=True)}"
                     f"{_mark(settings, method, best)}")
    return "\n".join(lines + _radius_lines(settings) + _confirm_lines(settings))


def _committee_table(settings: dict) -> str:
    members = settings["committee"]
    names = [m["name"] for m in members]
    base = settings["candidates"][0]["judges"]
    lines = [f"tuning committee of {len(names)} judges; choice: {settings['rule']} "
             f"({settings['max_recall_drop']})"]
    for i, member in enumerate(members, 1):
        b = base[member["name"]]
        lines.append(f"  [{i}] {member['name']} ({member['identity']}), reference {member['reference']['data']}: "
                     f"unboosted FID {b['fid']:.3f}, KID x1e3 {1e3 * b['kid']:.3f}, recall {b['recall']:.3f}")
    head = f"{'method':<9} {'worst':>7}"
    for i in range(1, len(names) + 1):
        head += f" {f'FID{i}':>7} {f'KID{i}':>7} {f'rec{i}':>6}"
    lines.append(head + f" {'L2 change':>9}  settings   (FID, KID: change vs unboosted in %)")
    for method, best in settings["methods"].items():
        line = f"{method:<9} {100 * best['worst']:6.1f}%"
        for name in names:
            change, recall = best["change"][name], best["judges"][name]["recall"]
            line += f" {100 * change['fid']:7.1f} {100 * change['kid']:7.1f} {recall:6.3f}"
        lines.append(line + f" {best['mean_l2_change']:9.3f}  {json.dumps(best['hyper'], sort_keys=True)}"
                            f"{_mark(settings, method, best)}")
    agreement = settings["agreement"]
    shown = lambda rho: "n/a" if rho is None else f"{rho:.3f}"  # noqa: E731
    lines.append(f"ranking agreement on the validation samples (Spearman rho of the {agreement['candidates']} "
                 f"candidates' FID):")
    for pair in agreement["pairs"]:
        a, b = (names.index(n) + 1 for n in pair["judges"])
        lines.append(f"  [{a}] vs [{b}]: {shown(pair['rho'])}")
    lines.append("  each judge against the others (mean): " +
                 ", ".join(f"[{i}] {shown(agreement['mean'][n])}" for i, n in enumerate(names, 1)))
    return "\n".join(lines + _radius_lines(settings) + _confirm_lines(settings))


