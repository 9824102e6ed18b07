"""The demo's shipped files (cmboost/assets/fmnist/): where they are, and each one read and checked:
the tuned settings, the judge check, the diagnostic, the gain map and the test-split references."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cmboost.errors import UserInputError
from cmboost.files.datasets import load_dataset
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.reference import load_reference, reference_stats, save_reference

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "fmnist"
SETTINGS_FILE = ASSETS / "demo.json"
JUDGE_CHECK_FILE = ASSETS / "judges.json"  # `cmboost check-judges` on the candidates (recipes/fmnist.sh)
REFERENCE_FILE = "ref-test-{judge}.npz"  # the test split's statistics per judge (recipes/fmnist.sh demo-refs)
DIAGNOSE_FILE = "diagnose-{booster}.json"  # `cmboost diagnose` of the booster (recipes/fmnist.sh), in ASSETS
GAIN_MAP_FILE = "gain-map.json"  # the summary of the recipe's gain map (recipes/gain_map.py, stage gain-map), in ASSETS
GAIN_MAP_FORMAT = "cmboost.gain-map-summary/1"


def load_settings(path: Path = SETTINGS_FILE) -> dict:
    """The shipped recipe's settings: checkpoints, sample seeds, and the tune files per generator."""
    if not path.is_file():
        raise UserInputError(f"{path}: missing; the demo's checkpoints are made by recipes/fmnist.sh")
    settings = json.loads(path.read_text())
    for name in list(settings["checkpoints"].values()) + list(settings["tuned"].values()):
        if not (ASSETS / name).is_file():
            raise UserInputError(f"{ASSETS / name}: missing shipped file (see recipes/fmnist.sh)")
    return settings


def load_judge_check(path: Path = JUDGE_CHECK_FILE) -> dict:
    """The shipped judge check: which candidate judges passed the ladder and the transfer test."""
    if not path.is_file():
        raise UserInputError(f"{path}: missing; the judge check is made by recipes/fmnist.sh (stage judges-check)")
    try:
        check = json.loads(path.read_text())
        if check.get("format") != "cmboost.judge_check" or not isinstance(check.get("judges"), dict):
            raise ValueError("not a cmboost check-judges report")
    except ValueError as err:
        raise UserInputError(f"{path}: unreadable judge check ({err})") from None
    return check


def read_finished_report(path: Path) -> dict:
    """A finished demo's report.json; a torn or foreign one is one line that says how to recover."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserInputError(f"{path}: not a readable demo report ({err}); pass --overwrite to run the demo "
                             "again, or delete it") from None
    return saved


def load_diagnostic(booster: str) -> dict | None:
    """The shipped judge-free diagnostic of the boosting network, or None where the recipe made none."""
    path = ASSETS / DIAGNOSE_FILE.format(booster=booster)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserInputError(f"{path}: unreadable diagnostic ({err})") from None


def load_gain_map() -> dict | None:
    """The shipped summary of where boosting pays (the recipe's gain map), or None where none was shipped."""
    path = ASSETS / GAIN_MAP_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError as err:
        raise UserInputError(f"{path}: unreadable gain map ({err})") from None
    if not isinstance(summary, dict) or summary.get("format") != GAIN_MAP_FORMAT:
        raise UserInputError(f"{path}: not a {GAIN_MAP_FORMAT} file (recipes/gain_map.py writes it)")
    return summary


def load_shipped_reference(name: str, judge):
    """The recipe's statistics of the whole test split under judge `name` (stage demo-refs), checked
    against the judge's weights."""

    path = ASSETS / REFERENCE_FILE.format(judge=name)
    if not path.is_file():
        raise UserInputError(f"{path}: missing; it is made by recipes/fmnist.sh stage demo-refs (or run the demo "
                             "with --quick or --full, which compute their own)")
    ref = load_reference(path)
    ref.check_against(judge)
    return ref


def write_shipped_references(judge_names, out_dir: str | os.PathLike = ASSETS, num_features: int = 1000,
                             overwrite: bool = False) -> list[Path]:
    """The statistics the standard demo reads (recipes/fmnist.sh stage demo-refs): for each judge, mu and
    sigma of all 10000 test images padded to 32x32, and the features of `num_features` of them for
    KID and precision/recall, stored compactly."""

    test_images, _, _ = load_dataset("fmnist", "test", image_size=32)
    written = []
    for name in judge_names:
        ref = reference_stats(test_images, load_feature_extractor(name, "cpu"), num_features=num_features,
                              source="fmnist test (32x32)")
        written.append(save_reference(Path(out_dir) / REFERENCE_FILE.format(judge=name), ref, overwrite=overwrite,
                                      compact=True))
    return written
