"""Boosting hyperparameters: one frozen record per method, checked once when built, and the flag of each field.

Kept free of torch so that the command line can show every default without importing it.
"""

from __future__ import annotations

import dataclasses
import math

from cmboost.errors import UserInputError

REALNESS_KINDS = ("sigmoid", "softmax")  # D(x,y) = sigmoid(f_y(x)), or p(y|x) = softmax(f(x))_y
OBJECTIVES = ("realness", "log_prob", "both")
# Hyperparameter -> the `cmboost boost` flag that sets it, so that every message names the flag.
FLAGS = {"steps": "--steps", "eps": "--eps", "step_size": "--step-size", "objective": "--objective",
         "realness_kind": "--realness", "threshold": "--threshold", "step": "--sgld-step",
         "noise": "--sgld-noise", "seed": "--seed"}


class _Validated:
    """Hyperparameter records check themselves once, when built: a record that exists is valid."""

    def __post_init__(self):
        _check_hyper(self)


@dataclasses.dataclass(frozen=True)
class PGDBoost(_Validated):
    """The paper's refinement: maximise the joint score inside ||x - x0||_2 <= eps."""
    eps: float = 3.0
    steps: int = 10
    step_size: float | None = None          # None: 2.5 * eps / steps, enough to reach the ball's edge
    objective: str = "both"                 # "realness": log D(x,y); "log_prob": log p(y|x); "both": their sum
    realness_kind: str = "softmax"          # D(x,y) = p(y|x) ("softmax") or sigmoid(f_y(x)) ("sigmoid")
    threshold: float | None = None          # early stop once D(x,y) >= threshold; None: never stop early


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
    step_size: float | None = None          # None: 1.5 * eps / steps


METHODS = {"pgd": PGDBoost, "sgld": SGLDBoost, "bigroc": BIGRoCBoost}


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


def as_record(method: str, hyper) -> PGDBoost | SGLDBoost | BIGRoCBoost:
    """`hyper` as the method's record: a record of that method is taken as it is (already checked)."""
    if method in METHODS and isinstance(hyper, METHODS[method]):
        return hyper
    if dataclasses.is_dataclass(hyper):
        raise UserInputError(f"--method {method}: got {type(hyper).__name__} hyperparameters")
    return make_hyper(method, **hyper)


def _check_hyper(record) -> None:
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{FLAGS[field.name]} {value}: must be a finite number")
    if int(record.steps) != record.steps or record.steps < 0:
        raise UserInputError(f"--steps {record.steps}: must be a whole number >= 0")
    if isinstance(record, (PGDBoost, BIGRoCBoost)):
        if record.eps <= 0:
            raise UserInputError(f"--eps {record.eps}: must be > 0")
        if record.step_size is not None and record.step_size <= 0:
            raise UserInputError(f"--step-size {record.step_size}: must be > 0")
    if isinstance(record, SGLDBoost) and (record.step < 0 or record.noise < 0):
        bad = "--sgld-step" if record.step < 0 else "--sgld-noise"
        raise UserInputError(f"{bad} {min(record.step, record.noise)}: must be >= 0")
    if isinstance(record, PGDBoost):
        if record.objective not in OBJECTIVES:
            raise UserInputError(f"--objective {record.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if record.realness_kind not in REALNESS_KINDS:
            raise UserInputError(f"--realness {record.realness_kind!r}: choose sigmoid or softmax")
