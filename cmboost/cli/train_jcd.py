"""`cmboost train-jcd`: adversarial training of the joint classifier-discriminator.

A thin layer over cmboost.jcd.training.train_jcd; the defaults are TrainConfig's, the released hyperparameters.
Works under torchrun (DDP; gloo on CPU, nccl on GPU). Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import functools

from cmboost.cli.common import add_field_flag, add_runtime_flags, record_from_args, set_record_defaults
from cmboost.jcd.attacks import NORMS
from cmboost.jcd.config import ATTACK_MODES, FLAGS, TrainConfig
from cmboost.jcd.losses import TRAINING_OBJECTIVES
from cmboost.jcd.model import ARCHS, SMALL_WIDTH
from cmboost.jcd.training import train_jcd
from cmboost.records import field_default

# --channels-last spells TrainConfig.channels_last's None/True/False as words.
CHANNELS_LAST = {"auto": None, "on": True, "off": False}


def record_from(args: argparse.Namespace):
    """The one TrainConfig of this run, checked as it is built: bad values fail before any file is read."""

    return record_from_args(TrainConfig, args, {
        "generated": list(args.generated or []), "betas": tuple(args.betas), "milestones": tuple(args.milestones),
        "channels_last": CHANNELS_LAST[args.channels_last]})


def run(args: argparse.Namespace) -> int:
    train_jcd(record_from(args))
    return 0


def add_parser(verbs) -> None:
    p = verbs.add_parser(
        "train-jcd", help="adversarially train the joint classifier-discriminator",
        description="Adversarial training of the joint classifier-discriminator on real data against "
                    "generated samples (docs/method.md §3). Defaults are the released hyperparameters. "
                    "Rerunning the same command resumes from the run directory's latest checkpoint.")

    field = functools.partial(add_field_flag, p, TrainConfig)
    p.add_argument("--data", required=True, help="real data: fmnist, imagenet64:PATH or folder:PATH")
    p.add_argument("--run-dir", required=True, help="run directory (checkpoints, log.jsonl, model.safetensors)")
    p.add_argument("--iters", type=int, required=True, help="training iterations")
    field("data_dir", "folder with the Fashion-MNIST files (default: the system copy)")
    field("generated", "generated samples (.npz with arr_1 = the labels they were generated for)",
          nargs="+", metavar="NPZ")
    field("arch", "backbone (default: that of --init)", choices=ARCHS)
    field("width", f"resnet_small: first-stage width (default: {SMALL_WIDTH})", type=int)
    field("objective", "training objective", choices=list(TRAINING_OBJECTIVES))
    field("init", "initial weights: ours, released, robustness-library or torchvision", metavar="PATH")
    field("image_size", "resize/pad real images to this size (default: the generated size)", type=int)
    field("real_limit", "use only the first N real images (default: all)", type=int)
    field("gen_batch_size", "global generated batch (default: --batch-size)", type=int)
    field("lr", "Adam learning rate", type=float)
    field("betas", "Adam betas", type=float, nargs=2, metavar=("B1", "B2"))
    field("weight_decay", "Adam weight decay", type=float)
    field("milestones", "iterations where lr *= gamma", type=int, nargs="*")
    field("gamma", "learning-rate factor at each milestone", type=float)
    field("grad_clip", "gradient-norm clip (0 disables)", type=float)
    field("attack_norm", "norm of both attacks' balls", choices=NORMS)
    field("real_eps", "radius of the attack on real images", type=float)
    field("real_steps", "steps of the attack on real images", type=int)
    field("real_step_size", "step length of the attack on real images", type=float)
    p.add_argument(FLAGS["real_random_start"], dest="real_random_start", action="store_false",
                   default=field_default(TrainConfig, "real_random_start"),
                   help="start the real attack at x (default: at a random point of the ball)")
    field("gen_eps", "radius of the attack on generated images", type=float)
    field("gen_steps", "initial steps of the attack on generated images", type=int)
    field("gen_step_size", "step length of the attack on generated images", type=float)
    p.add_argument("--gen-random-start", action="store_true", default=field_default(TrainConfig, "gen_random_start"),
                   help="start the generated attack at a random point of the ball (default: at x)")
    field("gen_steps_every", "one more generated-attack step every N iterations (0: never)", type=int)
    field("gen_max_steps", "cap on the generated-attack steps (default: none)", type=int)
    field("align_teacher", "add the gradient-alignment term: cosine of grad_x log p(y|x) with this EDM teacher's "
          "score on the clean real batch (default: off)", metavar="PATH")
    field("align_weight", "weight of the alignment term", type=float)
    field("align_sigma", "noise level of the teacher's score, in its [-1, 1] units", type=float)
    field("attack_mode", "model mode during the attacks (matters for BatchNorm backbones)", choices=ATTACK_MODES)
    channels_last = field_default(TrainConfig, "channels_last")
    p.add_argument("--channels-last", choices=list(CHANNELS_LAST),
                   default=next(word for word, value in CHANNELS_LAST.items() if value is channels_last),
                   help="channels-last memory layout; auto: on for CUDA (default: %(default)s)")
    field("log_every", "iterations between log.jsonl records", type=int)
    field("ckpt_every", "iterations between checkpoints", type=int)
    add_runtime_flags(p)
    # --batch-size here is the global real batch (split across processes).
    set_record_defaults(p, TrainConfig, ("batch_size", "seed", "device", "precision"))
    p.set_defaults(run=run)
