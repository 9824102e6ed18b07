"""Boosting hyperparameters: one frozen record per method, checked once when built, and the flag of each field.

Kept free of torch so that the command line can show every default without importing it.
"""

from __future__ import annotations

import dataclasses
import math

from cmboost.errors import UserInputError
from cmboost.records import SEED_LIMIT

REALNESS_KINDS = ("sigmoid", "softmax")  # D(x,y) = sigmoid(f_y(x)), or p(y|x) = softmax(f(x))_y
# The reading of realness a network is boosted with when nothing says otherwise (a train-jcd network
# records the one its objective trained); jcd/model.py reads D(x, y) with it too.
DEFAULT_REALNESS = "softmax"
PGD_STEP_FACTOR = 2.5     # L2 PGD's default step, 2.5 * eps / steps: enough to reach the ball's edge
BIGROC_STEP_FACTOR = 1.5  # BIGRoC's ImageNet rule, 1.5 * eps / steps
PGD_SCORES = ("realness", "log_prob", "both")  # what PGD boosting maximises (PGDBoost.objective)
# Hyperparameter -> the `cmboost boost` flag that sets it, so that every message names the flag.
FLAGS = {"steps": "--steps", "eps": "--eps", "step_size": "--step-size", "objective": "--objective",
         "realness_kind": "--realness", "threshold": "--threshold", "step": "--sgld-step",
         "noise": "--sgld-noise", "seed": "--seed"}


def step_length(eps, steps: int, factor: float = PGD_STEP_FACTOR):
    """The default step of an L2 attack of radius `eps` (a number or a per-image tensor) in `steps` steps."""
    return factor * eps / steps


class _Validated:
    """Hyperparameter records check themselves once, when built: a record that exists is valid."""

    def __post_init__(self):
        _check_hyper(self)


@dataclasses.dataclass(frozen=True)
class PGDBoost(_Validated):
    """The paper's refinement: maximise the joint score inside ||x - x0||_2 <= eps."""
    eps: float = 3.0
    steps: int = 10
    step_size: float | None = None          # None: step_length(eps, steps)
    objective: str = "both"                 # "realness": log D(x,y); "log_prob": log p(y|x); "both": their sum
    realness_kind: str = DEFAULT_REALNESS   # D(x,y) = p(y|x) ("softmax") or sigmoid(f_y(x)) ("sigmoid")
    threshold: float | None = None          # early stop once D(x,y) >= threshold; None: never stop early

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else step_length(self.eps, self.steps)


@dataclasses.dataclass(frozen=True)
class SGLDBoost(_Validated):
    """The released refinement. `step` is per image: the release differentiated a batch mean with
    batch 100 and a = 0.2, i.e. 0.002 per image."""
    steps: int = 15
    step: float = 0.002
    noise: float = 1e-4
    seed: int = 0                           # noise stream of sample i is (seed, index i)


@dataclasses.dataclass(frozen=True)
class BIGRoCBoost(_Validated):
    """BIGRoC: minimise CE(f(x), y) with L2 PGD; ImageNet settings eps 1.5, 7 steps, step 1.5 * eps / 7."""
    eps: float = 1.5
    steps: int = 7
    step_size: float | None = None          # None: step_length(eps, steps, BIGROC_STEP_FACTOR)

    @property
    def step(self) -> float:
        return self.step_size if self.step_size is not None else step_length(self.eps, self.steps, BIGROC_STEP_FACTOR)


METHODS = {"pgd": PGDBoost, "sgld": SGLDBoost, "bigroc": BIGRoCBoost}


class HyperError(UserInputError):
    """A bad hyperparameter value. Its message names the `cmboost boost` flag that sets it; `at`
    names the key of a file instead (a --grid or --settings file has no flags)."""

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"{FLAGS.get(name, '--' + name.replace('_', '-'))} {value}: {problem}")

    def at(self, where: str) -> UserInputError:
        return UserInputError(f"{where}: {self.name} {json_text(self.value)}: {self.problem}")


def json_text(value) -> str:
    """A value as a JSON file spells it (a string quoted, None as null), for messages about files."""
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def json_kind(value) -> str:
    """What JSON calls the type of `value` (for messages about files)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in ((dict, "an object"), (list, "a list"), (str, "a string"), ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def make_hyper(method: str, **hyper) -> PGDBoost | SGLDBoost | BIGRoCBoost:
    """The method's hyperparameter record; an unknown name is an error, never silently dropped."""
    if method not in METHODS:
        raise UserInputError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(hyper) - names)
    if unknown:
        raise UserInputError(f"method {method!r} has no hyperparameter {', '.join(unknown)} "
                             f"(it takes {', '.join(sorted(names))})")
    return cls(**hyper)


def hyper_in_file(method, hyper, where: str) -> PGDBoost | SGLDBoost | BIGRoCBoost:
    """The record of a candidate read from a file (`where` names the file and the key): every
    problem is reported against the file's key, never against a flag the verb may not have."""
    if not isinstance(method, str) or method not in METHODS:
        raise UserInputError(f"{where}: method {json_text(method)}: choose one of {', '.join(METHODS)}")
    if not isinstance(hyper, dict):
        raise UserInputError(f"{where}: hyperparameters must be a JSON object {{name: value}}, got {json_kind(hyper)}")
    try:
        return make_hyper(method, **hyper)
    except HyperError as err:
        raise err.at(where) from None
    except UserInputError as err:
        raise UserInputError(f"{where}: {err}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(record) -> None:
    """Each field holds what its annotation says (a file can hold a string where a number belongs);
    a whole-number float in an int field (5.0 from JSON) becomes that int."""
    for field in dataclasses.fields(record):
        value, kind = getattr(record, field.name), str(field.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("float"):
            if not _is_number(value):
                raise HyperError(field.name, value, "must be a number")
        elif kind.startswith("int"):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                object.__setattr__(record, field.name, int(value))
            elif not isinstance(value, int) or isinstance(value, bool):
                raise HyperError(field.name, value, "must be a whole number")
        elif kind.startswith("str") and not isinstance(value, str):
            raise HyperError(field.name, value, "must be a string")


def _check_hyper(record) -> None:
    _check_types(record)
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise HyperError(field.name, value, "must be a finite number")
    if record.steps < 0:
        raise HyperError("steps", record.steps, "must be a whole number >= 0")
    if isinstance(record, (PGDBoost, BIGRoCBoost)):
        if record.eps <= 0:
            raise HyperError("eps", record.eps, "must be > 0")
        if record.step_size is not None and record.step_size <= 0:
            raise HyperError("step_size", record.step_size, "must be > 0")
    if isinstance(record, SGLDBoost):
        if record.step < 0 or record.noise < 0:
            name = "step" if record.step < 0 else "noise"
            raise HyperError(name, getattr(record, name), "must be >= 0")
        if not 0 <= record.seed < SEED_LIMIT:
            raise HyperError("seed", record.seed, "must be in [0, 2^63)")
    if isinstance(record, PGDBoost):
        if record.objective not in PGD_SCORES:
            raise HyperError("objective", record.objective, f"choose one of {', '.join(PGD_SCORES)}")
        if record.realness_kind not in REALNESS_KINDS:
            raise HyperError("realness_kind", record.realness_kind, "choose sigmoid or softmax")
        if record.threshold is not None and not 0 < record.threshold < 1:
            raise HyperError("threshold", record.threshold, "must be in (0, 1), where the realness D(x, y) lies")
