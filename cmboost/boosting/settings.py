"""The settings file that `cmboost tune` writes and `cmboost boost --settings` reads: its format, its
checks, and what boosting takes from it (the method, its hyperparameters, the compute block, or the answer
"do not boost")."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cmboost.boosting.config import hyper_in_file, json_kind, json_text
from cmboost.errors import UserInputError

FORMAT = "cmboost.tune/1"                 # the settings file (`--out`, read by `boost --settings`)
BOOST_METHODS = ("pgd", "sgld", "bigroc")     # what `cmboost boost` runs
DO_NOT_BOOST = "none"


# The compute block of the settings files written before tune recorded it (fingerprint.batch_size):
# tune boosted 250 images together then, and `boost --settings` must boost those files' images alike.
LEGACY_BLOCK = 250


def do_not_boost(settings: dict) -> str | None:
    """The reason a settings file says not to boost, or None when it chose a method."""
    if settings.get("best") != DO_NOT_BOOST:
        return None
    return settings.get("decision", {}).get("reason", "tuning found no setting that helps")


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
    if "model" in fingerprint and not isinstance(fingerprint["model"], str):
        raise UserInputError(f"{where}: fingerprint.model {json_text(fingerprint['model'])}: the weights digest of "
                             f"the network tune was run for must be a string")
    best = settings.get("best")
    if best == DO_NOT_BOOST:
        reason = settings.get("decision", {}).get("reason") if isinstance(settings.get("decision"), dict) else None
        if not isinstance(reason, str):
            raise UserInputError(f"{where}: best \"none\" without decision.reason: a tune file that answers "
                                 f"\"do not boost\" says why")
    elif best not in tuned:
        raise UserInputError(f"{where}: best {json_text(best) if 'best' in settings else '(missing)'}: must name "
                             f"one of its tuned methods ({', '.join(tuned)}), or be \"none\"")
    return settings


def tuning_judges(settings: dict) -> list[dict]:
    """Every judge that tuned a settings file ({name, identity, role}): its committee, or its one judge."""
    return [{k: m[k] for k in ("name", "identity", "role")} for m in settings.get("committee", [settings["judge"]])]


def settings_block(settings: dict) -> int:
    """The compute block tune boosted the file's candidates with (fingerprint.batch_size; LEGACY_BLOCK
    for the files written before tune recorded it): `boost --settings` boosts with it, so that it
    writes the very images tune scored."""
    return settings.get("fingerprint", {}).get("batch_size", LEGACY_BLOCK)


def check_settings_network(settings: dict, source: str | os.PathLike, model_path: str | os.PathLike,
                           model_digest: str, allowed: bool) -> str | None:
    """None when the settings file was tuned for the network of `model_digest` (its weights as loaded,
    before any torch.compile renames them), or is older than the record of it (fingerprint.model);
    else one line saying so: refused unless `allowed` (--allow-other-network), since values tuned for
    one network's gradients need not suit another's."""
    tuned_for = settings.get("fingerprint", {}).get("model")
    if tuned_for is None or tuned_for == model_digest:
        return None
    line = (f"--settings {source} was tuned for the network with weights digest {tuned_for}, but --model "
            f"{model_path} has {model_digest}")
    if not allowed:
        raise UserInputError(f"{line}: its values may not suit this network; tune for it ('cmboost tune') or pass "
                             f"--allow-other-network to use them all the same")
    return line


def tuned_hyper(settings: dict, method: str | None, source: str) -> tuple[str, dict]:
    """(method, hyperparameters) from a settings file: the chosen method, or the one named. A file
    that answers "do not boost" names no method: the caller must name one (see do_not_boost)."""
    if method is None and do_not_boost(settings) is not None:
        raise UserInputError(f"--settings {source}: tuning chose not to boost ({do_not_boost(settings)}); name a "
                             f"--method to use one of its tuned settings all the same")
    method = method or settings["best"]
    if method not in settings["methods"] or method not in BOOST_METHODS:
        tuned = ", ".join(m for m in settings["methods"] if m in BOOST_METHODS)
        raise UserInputError(f"--settings {source}: has no tuned {method!r} (it has {tuned})")
    return method, dict(settings["methods"][method]["hyper"])
