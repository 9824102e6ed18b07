"""`cmboost train-cm`: train an EDM teacher, or a consistency model by distillation (cd), training (ct),
or easy consistency tuning from the teacher (ect).

The flags' defaults are those of cm/training.py's TrainSettings, UNetShape and LoopSettings (and MODE_DEFAULTS
where a mode differs); run builds the records before reading any data, so bad values fail first.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

from cmboost.cli.common import add_field_flag, add_runtime_flags, parse_int_list, record_from_args, set_record_defaults
from cmboost.cm.losses import DISTANCES
from cmboost.cm.train_config import (MODES, LoopSettings, TrainCMRun, TrainSettings, UNetShape, mode_default,
                                     mode_settings)
from cmboost.cm.training import train_cm
from cmboost.records import field_default

# Flags whose value is a comma-separated list of integers (a tuple in UNetShape).
LIST_FLAGS = ("channel_mult", "attention_resolutions")
# TrainSettings fields that no flag sets: the method's constants.
UNFLAGGED = ("p_mean", "p_std", "init_from_teacher", "ct_p_mean", "ct_p_std")


def shape_from_args(args: argparse.Namespace):
    lists = {name: parse_int_list(getattr(args, name), "--" + name.replace("_", "-")) for name in LIST_FLAGS}
    return record_from_args(UNetShape, args, lists)


def record_from(args: argparse.Namespace) -> TrainCMRun:
    """The run of the flags, before any data is read. Its settings' `unet` stays empty: the data gives
    the image size, channels and classes (and a CD or ECT run takes its UNet from the teacher)."""
    names = [f.name for f in dataclasses.fields(TrainSettings) if f.name not in UNFLAGGED + ("mode", "unet")]
    settings = mode_settings(args.mode, **{name: getattr(args, name) for name in names})
    return TrainCMRun(run_dir=args.run_dir, settings=settings, shape=shape_from_args(args),
                      loop=record_from_args(LoopSettings, args, {}), data_dir=args.data_dir, device=args.device,
                      precision=args.precision, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    train_cm(record_from(args))
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "train-cm", help="train an EDM teacher (edm), or a consistency model by distillation (cd), training (ct) "
             "or easy consistency tuning from the teacher (ect)",
        description="Class-conditional training on small data (Fashion-MNIST padded to 32x32 by default). "
                    "Keeps an EMA, saves run-dir/state.safetensors every --save-every iterations and exports "
                    "run-dir/model.safetensors (what 'cmboost sample --model' takes). Rerun the same command to "
                    "resume; --max-minutes stops it cleanly when its time is up. Works under torchrun (DDP).")
    setting = functools.partial(add_field_flag, p, TrainSettings)
    unet = functools.partial(add_field_flag, p, UNetShape)

    def per_mode(name: str, modes=MODES) -> str:
        return ", ".join(f"{mode} {mode_default(mode, name)}" for mode in modes)

    p.add_argument("--mode", required=True, choices=MODES)
    setting("data", "fmnist, imagenet64:PATH or folder:PATH")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx .gz files")
    p.add_argument("--run-dir", required=True, help="folder for state, exported model and log.jsonl")
    p.add_argument("--iters", type=int, required=True, help="total training iterations")
    setting("teacher", "cd, ect: the EDM teacher's model.safetensors (ect: its initial weights)")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {per_mode('lr')})")
    setting("warmup", "linear learning-rate warm-up iterations", type=int)
    setting("grad_clip", "gradient-norm clip (0: off)", type=float)
    setting("ema_rate", "EMA of the exported weights", type=float)
    setting("num_scales", "cd: Karras levels N", type=int)
    setting("target_ema", "cd: EMA rate of the target network", type=float)
    setting("start_scales", "ct: initial N-1 (doubles in stages)", type=int)
    setting("end_scales", "ct: final N-1", type=int)
    setting("ect_q", "ect: the gap between the two noise levels shrinks by this factor at each stage", type=float)
    setting("ect_stages", "ect: curriculum stages over --iters", type=int)
    p.add_argument("--distance", choices=DISTANCES, default=None,
                   help=f"cd/ct/ect distance (default: {per_mode('distance', ('cd', 'ct', 'ect'))})")
    unet("model_channels", "UNet base channels", type=int)
    for name, help in (("channel_mult", "channel multiplier per level, comma-separated"),
                       ("attention_resolutions", "resolutions (pixels) with attention, comma-separated")):
        p.add_argument("--" + name.replace("_", "-"), default=",".join(map(str, field_default(UNetShape, name))),
                       help=f"{help} (default: %(default)s)")
    unet("num_res_blocks", "residual blocks per level", type=int)
    unet("num_head_channels", "channels per attention head (-1: one head)", type=int)
    unet("dropout", "dropout rate", type=float)
    loop = functools.partial(add_field_flag, p, LoopSettings)
    loop("save_every", "iterations between saved states / exports", type=int)
    loop("log_every", "iterations between log.jsonl records", type=int)
    loop("max_minutes", "wall-time budget in minutes: past it, stop at the next iteration boundary with a saved "
         "state and an exported model; rerunning the same command (with or without it) resumes (default: no "
         "budget)", type=float)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_flags(p)
    set_record_defaults(p, TrainSettings, ("batch_size", "seed"))
    p.set_defaults(run=run)
