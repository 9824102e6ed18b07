"""The diagnostic's report: diagnose.json and pag.png written together, and the summary printed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_write_text, refuse_existing, refuse_unsafe_output
from cmboost.files.report import save_png

JSON_NAME, PNG_NAME = "diagnose.json", "pag.png"


def output_paths(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / JSON_NAME, out_dir / PNG_NAME


def check_outputs(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Before any work: --out is a folder (or free), and its two files are free unless `overwrite`."""
    refuse_unsafe_output(out_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir}: is a file; give a folder for {JSON_NAME} and {PNG_NAME}")
    for path in output_paths(out_dir):
        refuse_existing(path, overwrite)


# The top-level keys of diagnose.json; "provenance" (the files read) is the command line's.
REPORT_KEYS = ("format", "provenance", "accuracy", "realness", "alignment", "pag", "settings", "num_real",
               "num_classes", "device", "precision")


def _json_safe(value):
    """NaN and inf become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_diagnosis(out_dir: str | os.PathLike, report: dict, grid: np.ndarray, overwrite: bool = False) -> tuple[Path, Path]:
    """pag.png, then diagnose.json (last: its presence means both are whole). Each atomic."""

    json_path, png_path = output_paths(out_dir)
    check_outputs(out_dir, overwrite)
    save_png(grid, png_path, overwrite=overwrite)
    ordered = {key: report[key] for key in REPORT_KEYS if key in report}
    ordered.update({k: v for k, v in report.items() if k not in ordered})
    atomic_write_text(json_path, json.dumps(_json_safe(ordered), indent=1) + "\n")
    return json_path, png_path


def format_summary(report: dict) -> str:
    """A few lines for the terminal."""
    acc = report["accuracy"]
    lines = [f"clean accuracy {acc['clean']:.3f}; robust (L2 PGD, {acc['attack']['steps']} steps): "
             + ", ".join(f"eps {r['eps']:g} {r['accuracy']:.3f}" for r in acc["robust"])]
    real = report["realness"]["real"]
    lines.append(f"real: mean D ({report['realness']['kind']}) {real['mean_realness']:.3f}, mean p(y|x) {real['mean_p_y']:.3f}")
    for name, gen in report["realness"]["generators"].items():
        b, a = gen["before"], gen["after"]
        lines.append(f"{name} ({gen['method']}): realness AUC {b['auc']:.3f} -> {a['auc']:.3f}, "
                     f"mean p(y|x) {b['mean_p_y']:.3f} -> {a['mean_p_y']:.3f}, L2 change {gen['mean_l2_change']:.3f}")
    if report["alignment"] is not None:
        def fmt(rows):
            return ", ".join(f"sigma {r['sigma']:g} {r['mean']:.3f}" if r["mean"] is not None else f"sigma {r['sigma']:g} n/a"
                             for r in rows)
        lines.append(f"gradient-score cosine, real: {fmt(report['alignment']['real'])}")
        for name, gen in report["alignment"]["generators"].items():
            lines.append(f"  {name} before: {fmt(gen['before'])}; after: {fmt(gen['after'])}")
    pag = report["pag"]
    lines.append(f"PAG (eps {pag['eps']:g}, {pag['steps']} steps): mean p(target) from grey {pag['mean_target_prob_grey']:.3f}"
                 + (f", from real {pag['mean_target_prob_real']:.3f}" if pag["mean_target_prob_real"] is not None else ""))
    return "\n".join(lines)
