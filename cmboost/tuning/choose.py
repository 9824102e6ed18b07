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
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cmboost.boosting.apply import run_method
from cmboost.boosting.boost import check_fits_model
from cmboost.boosting.settings import BOOST_METHODS, DO_NOT_BOOST, FORMAT
from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_write_text, refuse_existing
from cmboost.files.checkpoints import weights_digest
from cmboost.files.samples import load_samples
from cmboost.jobs.job import Job, job_dir
from cmboost.metrics.evaluate import evaluate_images, prepared_statistics
from cmboost.metrics.judge_check import pool_features
from cmboost.metrics.separation import check_tuning_committee
from cmboost.metrics.stats import feature_statistics
from cmboost.tuning.candidates import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONTROL_METHODS, ERROR_BARS, HALVES,
                                       MIN_SAMPLES, TuneSettings, beyond_radius, check_classifier, check_grid,
                                       check_radius, default_grid)
from cmboost.tuning.rows import METRIC_KEYS, finished_rows


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def relative_change(value: float, base: float) -> float:
    """(value - base) / |base|: the change against the unboosted samples, in the base's own units,
    so judges of different scales weigh alike (rising with `value` whatever the base's sign; the
    plain difference when the base is 0)."""
    return (value - base) / abs(base) if base else value - base


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


@dataclasses.dataclass(frozen=True)
class ResolvedTune:
    """A tune run with its inputs loaded: the joint network (and the robust classifier of the BIGRoC
    candidates), the tuning judges with one training-data reference each (a committee when several),
    the candidates (`grid`; None: the default grid), the PGD early-stop threshold and reading of realness,
    and how the winner is chosen. `tuning.tune.resolve_tune` builds one from a TuneRun's files; the
    checks that need the loaded objects run in `run_tune`, once."""

    samples: str
    out: str
    model: torch.nn.Module
    judges: tuple
    references: tuple
    classifier: torch.nn.Module | None = None
    threshold: float | None = None
    grid: tuple | None = None
    realness_kind: str | None = None
    choice: TuneSettings = TuneSettings()
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    provenance: dict | None = None
    overwrite: bool = False
    progress: bool = True
    grid_source: str = "grid"               # where the candidates came from, as errors name it
    classifier_source: str = "classifier"   # and the classifier

    def __post_init__(self):
        if not self.judges:
            raise UserInputError("--judge: names no judge")
        if len(self.references) != len(self.judges):  # one reference per judge, in the judges' order
            raise UserInputError(f"--ref: {len(self.judges)} judge{'s' if len(self.judges) > 1 else ''} need one "
                                 f"reference each, given in --judge's order, and got {len(self.references)}")
        self.choice.check_radius_known()
        refuse_existing(self.out, self.overwrite)  # before anything is scored


def run_tune(run: ResolvedTune) -> dict:
    """Scores every candidate on `run.samples` with the tuning judges against their references
    (training-data statistics made by each judge), writes the settings file `run.out`, returns it.

    With several judges (a committee) the chosen candidate is the one whose worst relative change
    (vs the unboosted samples, per judge) of FID and KID across the committee is lowest, among those
    that keep recall under every judge; each judge's metrics of every candidate are recorded, with
    the judges' agreement on the ranking (`ranking_agreement`)."""
    choice, judges, references, model, classifier = (run.choice, list(run.judges), list(run.references), run.model,
                                                      run.classifier)
    check_tuning_committee(judges)
    for ref, one in zip(references, judges):
        ref.check_against(one)
        if "test" in str(ref.data).lower().split():
            raise UserInputError(f"{ref.source}: made from a test split ({ref.data}); tune against training data "
                                 "(cmboost evaluate-ref --split train) and keep the test split for the report")
    names = [j.name for j in judges]
    committee = len(judges) > 1
    out = Path(run.out)
    images, labels = load_samples(run.samples, num_classes=model.num_classes)
    if labels is None:
        raise UserInputError(f"{run.samples}: has no labels (arr_1); tuning boosts each image towards its label")
    if len(images) < MIN_SAMPLES:
        raise UserInputError(f"{run.samples}: {len(images)} images; tuning needs at least {MIN_SAMPLES}, half to "
                             f"choose on and half to confirm on (a few hundred give error bars that can exclude noise)")
    if classifier is not None:
        check_classifier(classifier, model, run.classifier_source)
    check_fits_model(images, labels, model, str(run.samples))
    if classifier is not None:
        check_fits_model(images, labels, classifier, str(run.samples))
    grid = default_grid(run.threshold, classifier is not None) if run.grid is None else list(run.grid)
    candidates = check_grid(grid, classifier is not None, run.realness_kind, run.grid_source)
    check_radius(candidates, choice)
    fingerprint = {"samples": _digest(images), "labels": _digest(labels), "model": weights_digest(model),
                   "classifier": weights_digest(classifier) if classifier is not None else None,
                   "judge": [j.identity for j in judges] if committee else judges[0].identity,
                   "reference": [_digest(r.mu) for r in references] if committee else _digest(references[0].mu),
                   "precision": run.precision,
                   "batch_size": choice.batch_size,  # the compute block: a resume must boost with the same one
                   "halves": "even/odd"}  # rows scored on both halves; a job of whole-set rows cannot resume
    keys = ["none"] + [json.dumps([m, h], sort_keys=True) for m, h in candidates]
    with Job(job_dir(out), fingerprint, restart=run.overwrite) as job:
        done = finished_rows(job, keys, names if committee else None)
        settings = _score_and_choose(job, done, keys, images, labels, model, classifier, judges, references, choice,
                                     run.device, run.precision, run.progress, run.provenance, fingerprint)
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


