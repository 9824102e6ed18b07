"""train-jcd's configuration record (the released hyperparameters as defaults) and its inputs, checked
before any work."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cmboost.errors import UserInputError
from cmboost.files.datasets import load_dataset
from cmboost.files.samples import load_samples
from cmboost.jcd.attacks import NORMS
from cmboost.jcd.losses import TRAINING_OBJECTIVES
from cmboost.jcd.model import ARCHS
from cmboost.records import check_above, check_at_least, check_choice, check_finite, check_fraction, check_seed, shown

ATTACK_MODES = ("eval", "train")
# The flags whose name is not --field-name; every message names the flag.
FLAGS = {"real_random_start": "--no-real-random-start"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Defaults are the released hyperparameters (docs/method.md §3); `cmboost train-jcd` reads its
    flags' defaults from here. Checked when built (no files are read): a config that exists is valid."""

    data: str                              # "fmnist", "imagenet64:PATH" or "folder:PATH"
    run_dir: str
    iters: int
    generated: list[str] = dataclasses.field(default_factory=list)  # .npz files with labels
    arch: str | None = None                # None: from --init
    width: int | None = None               # resnet_small only: first-stage width (None: jcd.SMALL_WIDTH)
    objective: str = "joint"
    init: str | None = None                # any checkpoint load_joint_model reads
    data_dir: str | None = None
    image_size: int | None = None          # None: the generated images' size
    real_limit: int | None = None          # use only the first N real images
    batch_size: int = 128                  # global real batch
    gen_batch_size: int | None = None      # global generated batch; None: batch_size
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (4000,)
    gamma: float = 0.1
    grad_clip: float = 1.0                 # 0 disables
    attack_norm: str = "l2"
    real_eps: float = 1.0
    real_steps: int = 2
    real_step_size: float = 0.5
    real_random_start: bool = True
    gen_eps: float = 100.0
    gen_steps: int = 5
    gen_step_size: float = 0.1
    gen_random_start: bool = False
    gen_steps_every: int = 1000            # one more generated-attack step every N iterations; 0: never
    gen_max_steps: int | None = None
    attack_mode: str = "eval"              # model mode during attacks: "eval" or "train"
    # The gradient-alignment term (cmboost.jcd.losses.GradientAlignment): off without a teacher.
    align_teacher: str | None = None       # an EDM teacher .safetensors (train-cm --mode edm): its score is the target
    align_weight: float = 1.0              # weight of mean(1 - cos(grad_x log p(y|x), score))
    align_sigma: float = 0.5               # the score's noise level, in the teacher's [-1, 1] units
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None      # None: on for CUDA
    log_every: int = 10
    ckpt_every: int = 500

    def __post_init__(self):
        _check(self)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["milestones"] = list(self.milestones)
        out["generated"] = [str(g) for g in self.generated]
        if self.align_teacher is None:  # runs from before the term existed resume with the same record
            for name in ("align_teacher", "align_weight", "align_sigma"):
                del out[name]
        return out


def _check(c: TrainConfig) -> None:
    check_finite(c, FLAGS)
    check_choice(c, "objective", TRAINING_OBJECTIVES)
    check_choice(c, "arch", ARCHS, allow_none=True)
    if c.arch is None and c.init is None:
        raise UserInputError("--arch: required when training from scratch (no --init)")
    if c.width is not None and (c.init is not None or c.arch != "resnet_small" or c.width < 1):
        raise UserInputError(f"--width {c.width}: only for resnet_small trained from scratch, and at least 1")
    check_choice(c, "attack_norm", NORMS)
    check_choice(c, "attack_mode", ATTACK_MODES)
    check_at_least(c, 0, ("iters", "real_eps", "real_step_size", "gen_eps", "gen_step_size", "weight_decay",
                          "grad_clip", "real_steps", "gen_steps", "gen_steps_every", "gen_max_steps", "milestones"))
    check_at_least(c, 1, ("batch_size", "gen_batch_size", "image_size", "real_limit", "log_every", "ckpt_every"))
    check_above(c, 0, ("lr", "gamma", "align_weight", "align_sigma"))
    if len(c.betas) != 2:
        raise UserInputError(f"--betas {shown(c.betas)}: give two numbers, B1 B2")
    check_fraction(c, ("betas",))
    check_seed(c)
    if c.objective != "ce" and not c.generated:
        raise UserInputError(f"--generated: objective {c.objective} needs generated samples (.npz with labels)")


def load_training_data(c: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                 torch.Tensor | None, int]:
    """Real (uint8 NCHW, labels), generated (uint8 NCHW, labels) and the number of classes,
    after checking that sizes, channels and labels agree."""
    gen_images, gen_labels = [], []
    for file in c.generated:
        images, labels = load_samples(file)
        if labels is None:
            raise UserInputError(f"--generated {file}: no labels (arr_1); training needs the labels "
                                 f"the images were generated for")
        if gen_images and images.shape[1:] != gen_images[0].shape[1:]:
            raise UserInputError(f"--generated {file}: images are {_chw(images.shape)}, "
                                 f"but {c.generated[0]} holds {_chw(gen_images[0].shape)}")
        if len(images) == 0:
            raise UserInputError(f"--generated {file}: holds no images")
        gen_images.append(images)
        gen_labels.append(labels)
    gen_size = gen_images[0].shape[-1] if gen_images else None
    kind = c.data.partition(":")[0]
    size = c.image_size
    if size is None and gen_size is not None and (kind == "folder" or (kind in ("fmnist", "fashion-mnist")
                                                                       and gen_size in (28, 32))):
        size = gen_size
    real, real_labels, num_classes = load_dataset(c.data, "train", data_dir=c.data_dir, image_size=size)
    if c.real_limit is not None:
        real, real_labels = real[: c.real_limit], real_labels[: c.real_limit]
    if len(real) == 0:
        raise UserInputError(f"--data {c.data}: no images")
    if gen_images:
        first = gen_images[0]
        if first.shape[1:] != real.shape[1:]:
            raise UserInputError(f"--generated {c.generated[0]}: images are {_chw(first.shape)} but --data "
                                 f"{c.data} gives {_chw(real.shape)}")
        for file, labels in zip(c.generated, gen_labels):
            if labels.max() >= num_classes:
                raise UserInputError(f"--generated {file}: label {labels.max()} out of range for the "
                                     f"{num_classes} classes of --data {c.data}")
        gen = torch.from_numpy(np.concatenate(gen_images))
        gen_y = torch.from_numpy(np.concatenate(gen_labels))
    else:
        gen = gen_y = None
    return torch.from_numpy(real), torch.from_numpy(real_labels), gen, gen_y, num_classes


def _chw(shape) -> str:
    return "x".join(str(v) for v in shape[1:])
