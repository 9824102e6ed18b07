"""Flags shared by several verbs, declared once so they read the same everywhere."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Iterable

from cmboost.errors import UserInputError
from cmboost.metrics.feature_nets import FeatureOptions
from cmboost.records import field_default, shown

# Help texts show %(default)s, not a number of their own: a verb's set_defaults (from its record)
# then shows in --help as well.


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --precision."""
    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N, cpu, or auto: cuda when present (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision; auto: bf16 on GPU, fp32 on CPU (default: %(default)s)")


def add_runtime_flags(parser: argparse.ArgumentParser, batch_help: str = "images per forward pass") -> None:
    """--device, --precision, --seed and --batch-size."""
    add_device_flags(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed; sample i uses stream (seed, i) (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help=f"{batch_help} (default: %(default)s)")


BLOCK_HELP = ("images the network sees together (memory follows it), image i in block i // size: the output "
              "depends on it and on nothing else of the batching")
PART_HELP = "images per resumable part file, rounded up to whole blocks; the output does not depend on it"


def set_record_defaults(parser: argparse.ArgumentParser, record_type: type, names) -> None:
    """Shared flags (--seed, --batch-size, ...) take their defaults from the verb's record."""
    parser.set_defaults(**{name: field_default(record_type, name) for name in names})


def add_field_flag(parser: argparse.ArgumentParser, record_type: type, name: str, help: str, *,
                   flag: str | None = None, type=None, nargs=None, choices=None, metavar=None) -> None:
    """A flag for the record field `name` (dest `name`, so the record can be built from the parsed
    flags) whose default is the field's and shows in --help. A None default stands for something
    that `help` must say itself. A hidden flag (help argparse.SUPPRESS) stays hidden."""
    default = field_default(record_type, name)
    if default is not None and help is not argparse.SUPPRESS:
        help = f"{help} (default: {shown(default)})"
    parser.add_argument(flag or "--" + name.replace("_", "-"), dest=name, type=type, nargs=nargs,
                        choices=choices, metavar=metavar, default=default, help=help)


def record_from_args(record_type: type, args: argparse.Namespace, given: dict, keep_defaults: Iterable[str] = ()):
    """The record from the parsed flags whose dest is a field name, `given` for the fields that the
    flags spell differently, and the record's own defaults for `keep_defaults` (fields no flag sets).
    A field found nowhere is a TypeError, not a silent default."""
    names = [f.name for f in dataclasses.fields(record_type) if f.init]
    unknown = (set(given) | set(keep_defaults)) - set(names)
    if unknown:
        raise TypeError(f"{record_type.__name__} has no field {', '.join(sorted(unknown))}")
    return record_type(**{n: given[n] if n in given else getattr(args, n) for n in names if n not in keep_defaults})


def add_output_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--out and --overwrite."""
    parser.add_argument("--out", required=required, help="output file")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def add_feature_flags(p: argparse.ArgumentParser) -> None:
    """The FeatureOptions flags evaluate and evaluate-ref share, with the record's defaults."""
    add_field_flag(p, FeatureOptions, "features",
                   "feature network(s), comma-separated, the first one for FID/sFID/IS/PR/KID/density/coverage: "
                   "inception, dinov2, effnet-lite0, a shipped domain net (fmnist, fmnist-allconv), or a domain-net "
                   ".safetensors")
    p.add_argument("--inception-weights", default=None,
                   help="weights-inception-2015-12-05-6726825d.pth, or its folder (default: $CMBOOST_WEIGHTS, "
                        "then torch's hub cache, then a download)")
    p.add_argument("--dinov2-weights", default=None,
                   help="dinov2_vitl14_pretrain.pth, or its folder (default: $CMBOOST_WEIGHTS, then torch's "
                        "hub cache, then a download)")
    p.add_argument("--overwrite", action="store_true", help="replace the output (--out / --json) if it exists")
    add_field_flag(p, FeatureOptions, "threads", "torch CPU threads; 0: torch's choice", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_flags(p)
    add_field_flag(p, FeatureOptions, "batch_size", "images per forward pass", type=int)
    set_record_defaults(p, FeatureOptions, ("device", "precision"))


def parse_int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    """A comma-separated list of integers given to `flag`, None when the flag is absent."""

    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise UserInputError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values:
        raise UserInputError(f"{flag}: empty list")
    return values
