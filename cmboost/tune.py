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
from cmboost.boost_config import hyper_in_file, json_kind, json_text, make_hyper
from cmboost.controls import UnsharpControl, l2_change, unsharp_mask
from cmboost.samples import load_samples, to_float, to_uint8
from cmboost.atomic import refuse_existing
from cmboost.errors import UserInputError
from cmboost.jobs import check_same_config, read_record, write_record
from cmboost.records import check_at_least, check_choice, check_finite, field_default
from cmboost.runtime import BLOCK_SIZE

FORMAT = "cmboost.tune/1"                 # the settings file (`--out`, read by `boost --settings`)
GRID_FORMAT = "cmboost.grid/1"            # a --grid file; its "format" key may be left out
PARTIAL_FORMAT = "cmboost.tune-partial/1"  # <out>.partial.json, the finished candidates of a resumable run
BOOST_METHODS = ("pgd", "sgld", "bigroc")     # what `cmboost boost` runs
CONTROL_METHODS = ("unsharp",)                # tuned alike, never chosen as "the" method
CRITERIA = ("fid", "kid")
# The compute block of the settings files written before tune recorded it (fingerprint.batch_size):
# tune boosted 250 images together then, and `boost --settings` must boost those files' images alike.
LEGACY_BLOCK = 250


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How the winner is chosen, and the boosting batch (`cmboost tune` reads its flags' defaults
    here); checked when built, so the command line fails before it loads anything."""

    criterion: str = "fid"          # what the tuning judge minimises
    max_recall_drop: float = 0.03   # candidates that lose more recall than this (vs unboosted) are not chosen
    batch_size: int = BLOCK_SIZE    # images boosted together (the compute block, boost's --block-size)

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


def _pick(rows: list[dict], method: str, criterion: str, recall_floor: float) -> dict | None:
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        return None
    allowed = [r for r in mine if r["metrics"]["recall"] >= recall_floor]
    best = min(allowed or mine, key=lambda r: r["metrics"][criterion])
    return dict(best, recall_ok=bool(allowed))


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


def tune(samples: str | os.PathLike, model, reference, judge, out: str | os.PathLike, classifier=None,
         threshold: float | None = None, grid: list[tuple[str, dict]] | None = None,
         criterion: str = field_default(TuneSettings, "criterion"),
         max_recall_drop: float = field_default(TuneSettings, "max_recall_drop"), realness_kind: str | None = None,
         device: torch.device | str = "cpu", precision: str = "fp32",
         batch_size: int = field_default(TuneSettings, "batch_size"), provenance: dict | None = None,
         overwrite: bool = False, progress: bool = True, grid_source: str = "grid",
         classifier_source: str = "classifier") -> dict:
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
    if classifier is not None:
        check_classifier(classifier, model, classifier_source)
    check_fits_model(images, labels, model, str(samples))
    if classifier is not None:
        check_fits_model(images, labels, classifier, str(samples))
    grid = default_grid(threshold, classifier is not None) if grid is None else grid
    candidates = check_grid(grid, classifier is not None, realness_kind, grid_source)
    fingerprint = {"samples": _digest(images), "labels": _digest(labels), "model": weights_digest(model),
                   "classifier": weights_digest(classifier) if classifier is not None else None,
                   "judge": judge.identity, "reference": _digest(reference.mu), "precision": precision,
                   "batch_size": batch_size}  # the compute block: a resume must boost with the same one
    partial = out.with_name(out.name + ".partial.json")
    keys = ["none"] + [json.dumps([m, h], sort_keys=True) for m, h in candidates]
    saved = None if overwrite else read_record(partial)
    done = {} if saved is None else _read_partial(saved, partial, fingerprint, keys)

    def score(images_u8: np.ndarray) -> dict:
        result = evaluate_images(images_u8, reference, judge)
        return {k: result[k] for k in METRIC_KEYS}

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
            # As a resume reads it back (keys sorted), and no timings: the same bytes on every run and resume.
            done[key] = json.loads(json.dumps(row, sort_keys=True))
            write_record(partial, {"format": PARTIAL_FORMAT, "fingerprint": fingerprint, "rows": done})
            bar.set_postfix_str(f"last {time.perf_counter() - t0:.1f} s", refresh=False)
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


METRIC_KEYS = ("fid", "kid", "kid_std", "is", "precision", "recall")


def _read_partial(saved: dict, partial: Path, fingerprint: dict, keys: list[str]) -> dict[str, dict]:
    """The finished rows of a resumable run's progress file, schema-checked: a file of another format
    or shape is named with its fix, never half-read."""
    fresh = "delete it to start over"
    if saved.get("format") != PARTIAL_FORMAT:
        raise UserInputError(f"{partial}: format {json_text(saved.get('format'))}: not a tune progress file of "
                             f"format {PARTIAL_FORMAT} (an older cmboost's, or another file); {fresh}")
    if not isinstance(saved.get("fingerprint"), dict):
        raise UserInputError(f"{partial}: fingerprint: expected an object, got {json_kind(saved.get('fingerprint'))}; "
                             f"{fresh}")
    rows = saved.get("rows")
    if not isinstance(rows, dict):
        raise UserInputError(f"{partial}: rows: expected an object {{candidate: row}}, got {json_kind(rows)}; {fresh}")
    for key, row in rows.items():
        if key in keys:
            _check_row(row, f"{partial}: rows[{json_text(key)}]", fresh)
    check_same_config(saved["fingerprint"], fingerprint, partial)
    return {key: row for key, row in rows.items() if key in keys}


def _check_row(row, where: str, fresh: str) -> None:
    def number(value, nullable=False) -> bool:
        return (value is None and nullable) or (isinstance(value, (int, float)) and not isinstance(value, bool))

    if not isinstance(row, dict):
        raise UserInputError(f"{where}: expected an object, got {json_kind(row)}; {fresh}")
    if not isinstance(row.get("method"), str) or not isinstance(row.get("hyper"), dict):
        raise UserInputError(f"{where}: needs a method (string) and hyper (object); {fresh}")
    metrics = row.get("metrics")
    if not isinstance(metrics, dict) or not all(number(metrics.get(k), k not in ("fid", "recall")) for k in METRIC_KEYS):
        raise UserInputError(f"{where}: metrics: expected numbers for {', '.join(METRIC_KEYS)}; {fresh}")
    if not number(row.get("mean_l2_change")):
        raise UserInputError(f"{where}: mean_l2_change: expected a number; {fresh}")


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
    """A settings file written by `cmboost tune`, schema-checked: its format, `best`, and each tuned
    method's hyperparameters, every error naming the file and the key."""
    path = Path(path)
    where = f"--settings {path}"
    if not path.is_file():
        raise UserInputError(f"{where}: no such file (write one with 'cmboost tune')")
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserInputError(f"{where}: not JSON ({err})") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise UserInputError(f"{where}: not a cmboost tune file (format {FORMAT})")
    methods = settings.get("methods")
    if not isinstance(methods, dict):
        raise UserInputError(f"{where}: methods: expected an object {{method: {{hyper: ...}}}}, got "
                             f"{'nothing' if 'methods' not in settings else json_kind(methods)}")
    for method, entry in methods.items():
        if method not in BOOST_METHODS:
            continue  # the controls are recorded, never used by boost
        if not isinstance(entry, dict):
            raise UserInputError(f"{where}: methods.{method}: expected an object {{hyper: ...}}, got {json_kind(entry)}")
        if not isinstance(entry.get("hyper"), dict):
            got = json_kind(entry["hyper"]) if "hyper" in entry else "nothing"
            raise UserInputError(f"{where}: methods.{method}.hyper: expected an object {{name: value}}, got {got}")
        hyper_in_file(method, entry["hyper"], f"{where}: methods.{method}.hyper")
    tuned = [m for m in methods if m in BOOST_METHODS]
    if not tuned:
        raise UserInputError(f"{where}: methods: holds no tuned boosting method ({', '.join(BOOST_METHODS)})")
    fingerprint = settings.get("fingerprint", {})
    if not isinstance(fingerprint, dict):
        raise UserInputError(f"{where}: fingerprint: expected an object, got {json_kind(fingerprint)}")
    block = fingerprint.get("batch_size", LEGACY_BLOCK)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise UserInputError(f"{where}: fingerprint.batch_size {json_text(block)}: the compute block tune boosted "
                             f"with must be a whole number >= 1")
    best = settings.get("best")
    if best not in tuned:
        raise UserInputError(f"{where}: best {json_text(best) if 'best' in settings else '(missing)'}: must name "
                             f"one of its tuned methods ({', '.join(tuned)})")
    return settings


def settings_block(settings: dict) -> int:
    """The compute block tune boosted the file's candidates with (fingerprint.batch_size; LEGACY_BLOCK
    for the files written before tune recorded it): `boost --settings` boosts with it, so that it
    writes the very images tune scored."""
    return settings.get("fingerprint", {}).get("batch_size", LEGACY_BLOCK)


def tuned_hyper(settings: dict, method: str | None, source: str) -> tuple[str, dict]:
    """(method, hyperparameters) from a settings file: the chosen method, or the one named."""
    method = method or settings["best"]
    if method not in settings["methods"] or method not in BOOST_METHODS:
        tuned = ", ".join(m for m in settings["methods"] if m in BOOST_METHODS)
        raise UserInputError(f"--settings {source}: has no tuned {method!r} (it has {tuned})")
    return method, dict(settings["methods"][method]["hyper"])
