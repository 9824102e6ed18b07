"""What the configuration records share: their defaults, read by the flags that set them, and the
checks they run on themselves, each failing with one line that names the flag.

Kept free of torch: the command line reads defaults from here while it builds --help.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from cmboost.errors import UserInputError

NO_FLAGS: Mapping[str, str] = MappingProxyType({})
SEED_LIMIT = 2 ** 63  # torch.manual_seed refuses seeds outside a signed 64-bit integer
# Feature networks run in fp32 unless asked otherwise, so that metrics compare across machines.
FEATURE_PRECISION = "fp32"


def field_default(record_type: type, name: str):
    """The default of `record_type`'s field `name` (a fresh one from its default_factory), so that a
    flag states no default of its own."""
    for field in dataclasses.fields(record_type):
        if field.name != name:
            continue
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise TypeError(f"{record_type.__name__}.{name} has no default")
    raise TypeError(f"{record_type.__name__} has no field {name!r}")


def param_default(function: Callable, name: str):
    """The default of `function`'s parameter `name`, for a flag that feeds that parameter."""
    default = inspect.signature(function).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{function.__name__}() has no default for {name!r}")
    return default


def shown(value) -> str:
    """A value as one types it on the command line: sequences space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value) or "none"
    return str(value)


def flag_of(name: str, flags: Mapping[str, str] = NO_FLAGS) -> str:
    """The flag that sets field `name`: its entry in `flags`, else --name-with-dashes."""
    return flags.get(name, "--" + name.replace("_", "-"))


def _items(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def check_finite(record, flags: Mapping[str, str] = NO_FLAGS) -> None:
    """Every float field (and every float in a sequence field) is finite. NaN passes every range
    check, because each comparison with it is False, so this runs first."""
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in _items(value)):
            raise UserInputError(f"{flag_of(field.name, flags)} {shown(value)}: must be a finite number")


def check_at_least(record, low: float, names: Iterable[str], flags: Mapping[str, str] = NO_FLAGS) -> None:
    """Each named field (every item of a sequence) is >= low; None means unset and passes."""
    for name in names:
        value = getattr(record, name)
        if value is not None and any(v < low for v in _items(value)):
            raise UserInputError(f"{flag_of(name, flags)} {shown(value)}: must be >= {low}")


def check_above(record, low: float, names: Iterable[str], flags: Mapping[str, str] = NO_FLAGS) -> None:
    """Each named field is > low; None means unset and passes."""
    for name in names:
        value = getattr(record, name)
        if value is not None and not value > low:
            raise UserInputError(f"{flag_of(name, flags)} {shown(value)}: must be > {low}")


def check_fraction(record, names: Iterable[str], flags: Mapping[str, str] = NO_FLAGS) -> None:
    """Each named field (every item of a sequence) lies in [0, 1): rates and momenta."""
    for name in names:
        value = getattr(record, name)
        if any(not 0 <= v < 1 for v in _items(value)):
            raise UserInputError(f"{flag_of(name, flags)} {shown(value)}: {'each ' if len(_items(value)) > 1 else ''}"
                                 f"must be in [0, 1)")


def check_choice(record, name: str, choices: Iterable[str], flags: Mapping[str, str] = NO_FLAGS,
                 allow_none: bool = False) -> None:
    value = getattr(record, name)
    choices = tuple(choices)
    if value not in choices and not (allow_none and value is None):
        raise UserInputError(f"{flag_of(name, flags)} {value!r}: choose one of {', '.join(choices)}")


def check_seed(record, name: str = "seed", flags: Mapping[str, str] = NO_FLAGS) -> None:
    value = getattr(record, name)
    if not 0 <= value < SEED_LIMIT:
        raise UserInputError(f"{flag_of(name, flags)} {value}: must be in [0, 2^63)")
