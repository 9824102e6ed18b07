"""Choosing the boosting method and its settings for one generator and one joint network.

Every candidate (a method and its hyperparameters) boosts the same validation samples; the tuning
judge scores the result against statistics of *training* data. The lowest FID wins among the
candidates that keep recall within `max_recall_drop` of the unboosted samples, per method and
overall. The reporting judges and the test split take no part: that is what lets a report made
with them be trusted (see cmboost/metrics/judges.py).

The unsharp-mask control is tuned on the same footing, so the report compares the method with
the best sharpening, not with an arbitrary one. Each finished candidate is written to
`<out>.partial.json`, so rerunning an interrupted tune resumes.
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

from cmboost.atomic import atomic_write_text
from cmboost.boost import boost_with
from cmboost.boost_config import make_hyper
from cmboost.controls import UnsharpControl, l2_change, unsharp_mask
from cmboost.samples import load_samples, to_float, to_uint8
from cmboost.atomic import refuse_existing
from cmboost.errors import UserInputError
from cmboost.jobs import check_same_config, read_record, write_record
from cmboost.records import check_at_least, check_choice, check_finite, field_default

FORMAT = "cmboost.tune/1"
BOOST_METHODS = ("pgd", "sgld", "bigroc")     # what `cmboost boost` runs
CONTROL_METHODS = ("unsharp",)                # tuned alike, never chosen as "the" method
CRITERIA = ("fid", "kid")


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How the winner is chosen, and the boosting batch (`cmboost tune` reads its flags' defaults
    here); checked when built, so the command line fails before it loads anything."""

    criterion: str = "fid"          # what the tuning judge minimises
    max_recall_drop: float = 0.03   # candidates that lose more recall than this (vs unboosted) are not chosen
    batch_size: int = 250           # images boosted together (a compute block, as boost's --block-size)

    def __post_init__(self):
        check_finite(self)
        check_choice(self, "criterion", CRITERIA)
        if not 0 <= self.max_recall_drop <= 1:
            raise UserInputError(f"--max-recall-drop {self.max_recall_drop}: must be within [0, 1]")
        check_at_least(self, 1, ("batch_size",))


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


def resolve_candidate(method: str, hyper: dict, realness_kind: str | None) -> dict:
    """The full, validated hyperparameters of one candidate, as stored in the settings file."""
    if method == "unsharp":
        return dataclasses.asdict(UnsharpControl(**hyper))
    if method == "pgd" and realness_kind is not None:
        hyper = {"realness_kind": realness_kind, **hyper}
    return dataclasses.asdict(make_hyper(method, **hyper))


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


def _pick(rows: list[dict], method: str, criterion: str, recall_floor: float) -> dict | None:
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        return None
    allowed = [r for r in mine if r["metrics"]["recall"] >= recall_floor]
    best = min(allowed or mine, key=lambda r: r["metrics"][criterion])
    return dict(best, recall_ok=bool(allowed))


def tune(samples: str | os.PathLike, model, reference, judge, out: str | os.PathLike, classifier=None,
         threshold: float | None = None, grid: list[tuple[str, dict]] | None = None,
         criterion: str = field_default(TuneSettings, "criterion"),
         max_recall_drop: float = field_default(TuneSettings, "max_recall_drop"), realness_kind: str | None = None,
         device: torch.device | str = "cpu", precision: str = "fp32",
         batch_size: int = field_default(TuneSettings, "batch_size"), provenance: dict | None = None,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Scores every candidate on `samples` with `judge` (a tuning judge) against `reference`
    (training-data statistics made by that judge), writes the settings file `out`, returns it."""
    from tqdm import tqdm

    from cmboost.boost_job import check_fits_model
    from cmboost.checkpoints import weights_digest
    from cmboost.metrics.evaluate import evaluate_images
    from cmboost.metrics.judges import check_tuning_judge

    TuneSettings(criterion, max_recall_drop, batch_size)  # bad values fail before any work
    check_tuning_judge(judge)
    reference.check_against(judge)
    if "test" in str(reference.data).lower().split():
        raise UserInputError(f"{reference.source}: made from a test split ({reference.data}); tune against "
                             "training data (cmboost evaluate-ref --split train) and keep the test split for the report")
    out = Path(out)
    refuse_existing(out, overwrite)
    images, labels = load_samples(samples, num_classes=model.num_classes)
    if labels is None:
        raise UserInputError(f"{samples}: has no labels (arr_1); tuning boosts each image towards its label")
    check_fits_model(images, labels, model, str(samples))
    if classifier is not None:
        check_fits_model(images, labels, classifier, str(samples))
    grid = default_grid(threshold, classifier is not None) if grid is None else grid
    candidates = [(m, resolve_candidate(m, h, realness_kind)) for m, h in grid]
    fingerprint = {"samples": _digest(images), "labels": _digest(labels), "model": weights_digest(model),
                   "classifier": weights_digest(classifier) if classifier is not None else None,
                   "judge": judge.identity, "reference": _digest(reference.mu), "precision": precision,
                   "batch_size": batch_size}  # the compute block: a resume must boost with the same one
    partial = out.with_name(out.name + ".partial.json")
    done: dict[str, dict] = {}
    saved = None if overwrite else read_record(partial)
    if saved is not None:
        check_same_config(saved.get("fingerprint", {}), fingerprint, partial)
        done = saved.get("rows", {})

    def score(images_u8: np.ndarray) -> dict:
        result = evaluate_images(images_u8, reference, judge)
        return {k: result[k] for k in ("fid", "kid", "kid_std", "is", "precision", "recall")}

    keys = ["none"] + [json.dumps([m, h], sort_keys=True) for m, h in candidates]
    bar = tqdm(total=len(keys), desc="tune", unit="candidate", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, initial=sum(k in done for k in keys))
    with bar:
        for key in keys:
            if key in done:
                continue
            t0 = time.perf_counter()
            if key == "none":
                row = {"method": "none", "hyper": {}, "metrics": score(images), "mean_l2_change": 0.0}
            else:
                method, hyper = json.loads(key)
                boosted, change = run_method(method, hyper, model, classifier, images, labels, device,
                                             batch_size, precision)
                row = {"method": method, "hyper": hyper, "metrics": score(boosted),
                       "mean_l2_change": float(change.mean())}
            done[key] = dict(row, seconds=round(time.perf_counter() - t0, 2))
            write_record(partial, {"fingerprint": fingerprint, "rows": done})
            bar.update(1)

    rows = [done[k] for k in keys]
    base = rows[0]["metrics"]
    floor = base["recall"] - max_recall_drop
    methods = {m: _pick(rows, m, criterion, floor) for m in BOOST_METHODS + CONTROL_METHODS}
    methods = {m: best for m, best in methods.items() if best is not None}
    chosen = min((m for m in BOOST_METHODS if m in methods),
                 key=lambda m: (not methods[m]["recall_ok"], methods[m]["metrics"][criterion]))
    settings = {"format": FORMAT, "best": chosen, "criterion": criterion, "max_recall_drop": max_recall_drop,
                "judge": {"name": judge.name, "identity": judge.identity, "role": "tuning"},
                "reference": {"source": str(reference.source), "data": str(reference.data)},
                "fingerprint": fingerprint, "provenance": provenance or {}, "unboosted": base,
                "methods": methods, "candidates": rows}
    atomic_write_text(out, json.dumps(settings, indent=1))
    partial.unlink(missing_ok=True)
    return settings


def format_table(settings: dict) -> str:
    """One line per method's best setting, then the unboosted row, under the tuning judge."""
    crit = settings["criterion"]
    lines = [f"tuning judge: {settings['judge']['name']} ({settings['judge']['identity']}); reference: "
             f"{settings['reference']['data']}; criterion: lowest {crit.upper()} with recall within "
             f"{settings['max_recall_drop']} of unboosted",
             f"{'method':<9} {'FID':>8} {'KID x1e3':>9} {'recall':>7} {'L2 change':>9}  settings"]
    base = settings["unboosted"]
    lines.append(f"{'none':<9} {base['fid']:8.3f} {1e3 * base['kid']:9.3f} {base['recall']:7.3f} {0.0:9.3f}")
    for method, best in settings["methods"].items():
        m = best["metrics"]
        mark = " (chosen)" if method == settings["best"] else "" if best["recall_ok"] else " (recall drops)"
        lines.append(f"{method:<9} {m['fid']:8.3f} {1e3 * m['kid']:9.3f} {m['recall']:7.3f} "
                     f"{best['mean_l2_change']:9.3f}  {json.dumps(best['hyper'], sort_keys=True)}{mark}")
    return "\n".join(lines)


def load_settings_file(path: str | os.PathLike) -> dict:
    """A settings file written by `cmboost tune`, checked enough to use."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--settings {path}: no such file (write one with 'cmboost tune')")
    try:
        settings = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserInputError(f"--settings {path}: not JSON ({err})") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT or "methods" not in settings:
        raise UserInputError(f"--settings {path}: not a cmboost tune file (format {FORMAT})")
    return settings


def tuned_hyper(settings: dict, method: str | None, source: str) -> tuple[str, dict]:
    """(method, hyperparameters) from a settings file: the chosen method, or the one named."""
    method = method or settings["best"]
    if method not in settings["methods"] or method not in BOOST_METHODS:
        tuned = ", ".join(m for m in settings["methods"] if m in BOOST_METHODS)
        raise UserInputError(f"--settings {source}: has no tuned {method!r} (it has {tuned})")
    return method, dict(settings["methods"][method]["hyper"])
