"""The Python API: one function per command-line verb, over the same library function the verb calls.

Each function takes the verb's record (the frozen, self-checking configuration the command line
builds from its flags) or keyword arguments naming that record's fields, never both; a field that
does not exist is a TypeError, never silently dropped. The defaults are the records' own. Functions
that boost, sample or evaluate work on files, and also on arrays (uint8 NCHW images and int64
labels), which they pass through a temporary file so that the images are exactly the file path's.
docs/api.md shows them in use.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

from cmboost.boosting.boost import BoostRun
from cmboost.boosting.boost import boost as boost_run
from cmboost.cm.sample import SampleRun
from cmboost.cm.sample import sample as sample_run
from cmboost.cm.train_config import TrainCMRun
from cmboost.cm.training import train_cm as train_cm_run
from cmboost.demo.assets import ASSETS
from cmboost.diagnostic.diagnose import DiagnoseRun
from cmboost.diagnostic.diagnose import diagnose_files as diagnose_run
from cmboost.errors import UserInputError
from cmboost.files.samples import load_samples, save_samples
from cmboost.jcd.config import TrainConfig
from cmboost.jcd.training import train_jcd as train_jcd_run
from cmboost.metrics.check_judges import JudgeCheckRun
from cmboost.metrics.check_judges import check_judges as check_judges_run
from cmboost.metrics.evaluate import EvaluateRun
from cmboost.metrics.evaluate import evaluate as evaluate_run
from cmboost.metrics.evaluate_ref import ReferenceRun, make_reference
from cmboost.metrics.train_features import FeatureTraining
from cmboost.metrics.train_features import train_features as train_features_run
from cmboost.tuning.tune import TuneRun
from cmboost.tuning.tune import tune_files as tune_run

__all__ = ["asset", "sample", "boost", "tune", "evaluate", "evaluate_ref", "check_judges", "diagnose", "train_jcd",
           "train_cm", "train_features"]

def _record(record_type: type, record, fields: dict):
    """`record` itself, or the record built from `fields` (each checked against its annotation, then
    the record checks itself)."""
    if record is not None and fields:
        raise TypeError(f"pass a {record_type.__name__} or keyword arguments, not both")
    if record is None:
        return record_type(**_checked_arguments(record_type, fields))
    if not isinstance(record, record_type):
        raise TypeError(f"expected a {record_type.__name__}, got {_kind(record)}")
    return record


# ----------------------------------------------------------------------------- argument types
# Each function checks its arguments against the annotations of what it calls, at the top, so that a
# wrong type is a TypeError naming the argument, not an error deep inside (a string iterated letter by
# letter where a list was meant, a dict where a record was meant, a float count). A path may be given
# as a str or an os.PathLike wherever a str path is expected.

def _kind(value) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float)) else type(value).__name__


def _checked_arguments(target, arguments: dict) -> dict:
    """`arguments` checked against the type hints of `target` (a record type or a function), with
    paths made str where str is expected; an argument it has no hint for passes as given."""
    hints = typing.get_type_hints(target)
    return {name: _checked(name, value, hints[name]) if name in hints else value for name, value in arguments.items()}


def _checked(name: str, value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _checked(name, value, option)
            except TypeError:
                continue
        wanted = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise TypeError(f"{name}: expected {wanted}, got {_kind(value)}")
    if hint is typing.Any:
        return value
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a string, got {_kind(value)}")
        return value
    if hint is bool:
        if type(value).__name__ not in ("bool", "bool_"):
            raise TypeError(f"{name}: expected True or False, got {_kind(value)}")
        return bool(value)
    if hint is int:
        if not isinstance(value, numbers.Integral) or type(value).__name__ in ("bool", "bool_"):
            raise TypeError(f"{name}: expected a whole number (int), got {_kind(value)}")
        return int(value)
    if hint is float:
        if not isinstance(value, numbers.Real) or type(value).__name__ in ("bool", "bool_"):
            raise TypeError(f"{name}: expected a number, got {_kind(value)}")
        return value
    if hint is dict:
        if not isinstance(value, collections.abc.Mapping):
            raise TypeError(f"{name}: expected a dict, got {_kind(value)}")
        return dict(value)
    if hint in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
        array = type(value).__name__ == "ndarray" and origin is collections.abc.Sequence
        if isinstance(value, (str, bytes)) or not (isinstance(value, (list, tuple)) or array):
            hint_text = f"; write {name}=[{value!r}] for one" if isinstance(value, str) else ""
            raise TypeError(f"{name}: expected a list or tuple, got {_kind(value)}{hint_text}")
        if array:
            return value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise TypeError(f"{name}: expected {len(args)} values, got {len(value)}")
            items = [_checked(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        elif args:
            items = [_checked(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
        else:
            items = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        return list(items) if list in (hint, origin) else tuple(items)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            fix = f"; build one: {hint.__name__}(**{name})" if isinstance(value, collections.abc.Mapping) else ""
            raise TypeError(f"{name}: expected a {hint.__name__}, got {_kind(value)}{fix}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"{name}: expected {hint.__name__}, got {_kind(value)}")
    return value


def _path_argument(name: str, value, optional: bool = False):
    """A file argument: a str or os.PathLike (None when `optional`)."""
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path (str or os.PathLike), got {_kind(value)}")
    return value


def _samples_argument(samples, arrays_too: bool = True):
    """A sample file's path, or (images, labels) arrays."""
    if isinstance(samples, (str, os.PathLike)):
        return samples
    if arrays_too and isinstance(samples, (tuple, list)) and len(samples) == 2:
        return tuple(samples)
    raise TypeError(f"samples: expected a sample file's path or an (images, labels) pair, got {_kind(samples)}")


def _as_file(samples, folder: str, name: str) -> str:
    """A sample file's path as given, or (images, labels) arrays written to `folder`."""
    if isinstance(samples, (str, os.PathLike)):
        return str(samples)
    images, labels = samples
    return str(save_samples(Path(folder) / name, np.asarray(images), None if labels is None else np.asarray(labels)))


def asset(name: str) -> Path:
    """A file shipped with cmboost (cmboost/assets/fmnist/): checkpoints, tune settings, references."""
    name = os.fspath(_path_argument("name", name))
    # a bare name of a file in the folder: never a path that leads elsewhere ("/etc/x", "../../x")
    if name not in {path.name for path in ASSETS.iterdir() if path.is_file()}:
        raise UserInputError(f"asset {name!r}: not the name of a file shipped with cmboost (the names are in "
                             f"cmboost/assets/fmnist/README.md)")
    return ASSETS / name


def sample(model: str | os.PathLike, num: int, out: str | os.PathLike | None = None, **fields: Any):
    """`cmboost sample`: `num` samples of a consistency model (or EDM teacher) checkpoint. Writes `out`
    (.npz or PNG folder; a rerun resumes) and returns its path; without `out`, returns (images, labels).
    `fields` are cm.sample.SampleRun's (steps, seed, ts, num_levels, class_labels, kind, batch_size,
    block_size, device, precision, overwrite, progress)."""
    model = os.fspath(_path_argument("model", model))
    out = _path_argument("out", out, optional=True)
    fields = _checked_arguments(SampleRun, {"num": num, **fields})
    if out is not None:
        return sample_run(SampleRun(model=model, out=os.fspath(out), **fields))
    with tempfile.TemporaryDirectory() as folder:
        return load_samples(sample_run(SampleRun(model=model, out=str(Path(folder) / "samples.npz"), **fields)))


def boost(samples=None, model: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
          run=None, **fields: Any):
    """`cmboost boost`: refines `samples` (a sample file, or (images, labels) arrays) with the joint
    network `model`. Writes `out` and returns its path; without `out`, returns (images, labels).
    `fields` are boosting.boost.BoostRun's (method, hyper, settings, threshold_from, labels, seed,
    block_size, device, precision, ...); or pass the whole `run`, a BoostRun."""

    if run is not None:
        if samples is not None or model is not None or out is not None or fields:
            raise TypeError("pass a BoostRun or the samples, model, out and keyword arguments, not both")
        return boost_run(run)
    samples = _samples_argument(samples)
    model = _path_argument("model", model)
    out = _path_argument("out", out, optional=True)
    fields = _checked_arguments(BoostRun, fields)
    with tempfile.TemporaryDirectory() as folder:
        target = out if out is not None else Path(folder) / "boosted.npz"
        record = BoostRun(samples=_as_file(samples, folder, "samples.npz"), model=str(model), out=str(target),
                          **{"grid": out is not None, **fields})
        path = boost_run(record)
        return path if out is not None else load_samples(path)


def tune(run=None, /, **fields: Any) -> dict:
    """`cmboost tune`: chooses the boosting method and settings on validation samples with tuning
    judges; writes the settings file (`out`) and returns it. `run`: a tuning.tune.TuneRun; else its fields
    (samples, model, refs, out, judges, classifier, threshold_from, grid, choice: a TuneSettings, ...)."""
    return tune_run(_record(TuneRun, run, fields))  # refs and judges: lists or tuples, paths as str


def evaluate(samples=None, reference=None, *, run=None, **fields: Any) -> dict:
    """`cmboost evaluate`: FID, sFID, IS, precision, recall, KID, density and coverage of `samples` (a
    sample file, or uint8 NCHW images, or (images, labels)) against `reference` (a .npz/.pkl path, or
    a list of them, one per feature network). `fields` are metrics.evaluate.EvaluateRun's (features,
    batch_size, device, precision, json, progress, ...); or pass the whole `run`, an EvaluateRun."""
    if run is not None:
        if samples is not None or reference is not None or fields:
            raise TypeError("pass an EvaluateRun or the samples, reference and keyword arguments, not both")
        return evaluate_run(_checked("run", run, EvaluateRun))
    if isinstance(samples, np.ndarray):
        samples = (samples, None)
    samples = _samples_argument(samples)
    refs = tuple(os.fspath(_path_argument("reference", r)) for r in
                 (reference if isinstance(reference, (list, tuple)) else [reference]))
    fields = _checked_arguments(EvaluateRun, fields)
    with tempfile.TemporaryDirectory() as folder:
        return evaluate_run(EvaluateRun(samples=_as_file(samples, folder, "samples.npz"), refs=refs, **fields))


def evaluate_ref(run=None, /, **fields: Any) -> dict:
    """`cmboost evaluate-ref`: the statistics of a dataset split under `features`, written to `out`
    (.npz, one network; or .pkl) and summarised. `run`: a metrics.evaluate_ref.ReferenceRun; else its
    fields (data, out, split, features, num_features, seed, batch_size, device, ...)."""
    return make_reference(_record(ReferenceRun, run, fields))


def check_judges(run=None, /, **fields: Any) -> dict:
    """`cmboost check-judges`: puts candidate judges through the degradation ladder and the
    adversarial-transfer test; writes the report (`out`) and returns it. `run`: a
    metrics.check_judges.JudgeCheckRun; else its fields (samples, out, judges, attacker, data, ...)."""
    return check_judges_run(_record(JudgeCheckRun, run, fields))


def diagnose(run=None, /, **fields: Any) -> dict:
    """`cmboost diagnose`: the judge-free diagnostic of a joint network (robust accuracy, realness AUC,
    gradient-score alignment, the PAG picture); writes OUT/diagnose.json and OUT/pag.png and returns
    the report. `run`: a diagnostic.diagnose.DiagnoseRun; else its fields (model, out, samples as (name,
    path) pairs, teacher, real, settings_files, method, hyper, numbers: a DiagnoseSettings, ...)."""
    for name in ("samples", "settings_files"):
        if isinstance(fields.get(name), (list, tuple)):  # anything else is refused by _record, naming it
            fields[name] = tuple(tuple(v) if isinstance(v, list) else v for v in fields[name])
    return diagnose_run(_record(DiagnoseRun, run, fields))


def train_jcd(config=None, /, **fields: Any) -> Path:
    """`cmboost train-jcd`: adversarial training of the joint classifier-discriminator; returns the
    final model's path. `config`: a jcd.config.TrainConfig; else its fields (data, run_dir,
    iters, generated, objective, ...). A rerun of the same configuration resumes."""
    return train_jcd_run(_record(TrainConfig, config, fields))


def train_cm(run=None, /, **fields: Any) -> Path:
    """`cmboost train-cm`: an EDM teacher or a consistency model (cd, ct, ect); returns the exported
    model's path. `run`: a cm.train_config.TrainCMRun; else its fields (run_dir, settings: a
    TrainSettings, e.g. from cm.train_config.mode_settings("ect", iters=..., teacher=...), shape: a
    UNetShape, loop: a LoopSettings, data_dir, device, precision, progress). A rerun resumes."""
    return train_cm_run(_record(TrainCMRun, run, fields))


def train_features(run=None, /, **fields: Any) -> Path:
    """`cmboost train-features`: a domain feature network (a judge for FID and the like) trained on a
    dataset's train split; returns the saved net's path. `run`: a metrics.train_features.FeatureTraining;
    else its fields (data, out, settings, arch, ...). A rerun resumes per epoch."""
    return train_features_run(_record(FeatureTraining, run, fields))
