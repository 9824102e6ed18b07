"""The joint classifier-discriminator (JCD): one network f with K logits (docs/method.md §1-2).

- classifier: p(y|x) = softmax(f(x))_y;
- energy model: E(x, y) = -f_y(x), unconditional E(x) = -logsumexp_k f_k(x);
- discriminator, two readings: "sigmoid" = sigmoid(f_y(x)) (released code), "softmax" = p(y|x) (paper).

Inputs are images in [0, 1], NCHW; the mean/std normalisation lives inside the model so
attacks and boosting work in pixel space.

Checkpoints: our own format is a cmboost checkpoint (cmboost/files/checkpoints.py, format "jcd") holding
the backbone's state_dict (torchvision key names) with the model config, enough to rebuild the
model from the file alone. `load_joint_model` also imports the released checkpoints (keys under
`model.` + `dummy`), robustness-library checkpoints (`module.model.*`, `module.attacker.model.*`,
`module.normalizer.*`), and plain torchvision state_dicts, never unpickling code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmboost.boosting.config import REALNESS_KINDS
from cmboost.errors import UserInputError
from cmboost.files.checkpoints import (check_fits, describe_keys, find_state_dict, read_checkpoint, save_checkpoint,
                                       strip_layout, torch_load)

ARCHS = ("resnet50", "wide_resnet50_2", "resnet_small")
SMALL_WIDTH = 16  # resnet_small's first-stage width (then 2w, 4w)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# resnet_small is trained from scratch on [0, 1] images: centre them on 0.5.
SMALL_MEAN, SMALL_STD = 0.5, 0.5
FORMAT, FORMAT_VERSION = "jcd", 2  # version 1: the header before cmboost.files.checkpoints


# ----------------------------------------------------------------------------- logits -> scores

def log_prob_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] log p(y|x) = f_y - logsumexp f, in fp32."""
    logits = logits.float()
    return logits.gather(1, y.view(-1, 1)).squeeze(1) - torch.logsumexp(logits, dim=1)


def log_not_prob_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] log(1 - p(y|x)) = logsumexp_{k != y} f_k - logsumexp f: exact, no cancellation near p = 1."""
    logits = logits.float()
    others = logits.scatter(1, y.view(-1, 1), float("-inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(logits, dim=1)


def realness_from_logits(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """[B] D(x, y): sigmoid(f_y(x)) for "sigmoid", p(y|x) for "softmax"."""
    return log_realness_from_logits(logits, y, kind).exp()


def log_realness_from_logits(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """[B] log D(x, y): logsigmoid(f_y) or log p(y|x); stable for large |f|."""
    if kind == "sigmoid":
        return F.logsigmoid(logits.float().gather(1, y.view(-1, 1)).squeeze(1))
    if kind == "softmax":
        return log_prob_from_logits(logits, y)
    raise UserInputError(f"realness kind {kind!r}: choose one of {', '.join(REALNESS_KINDS)}")


# ----------------------------------------------------------------------------- the model

class JointModel(nn.Module):
    """Wraps a backbone that maps normalised images to K logits. `forward` == `logits`."""

    def __init__(self, backbone: nn.Module, arch: str, num_classes: int, in_channels: int, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise UserInputError(f"mean/std need {in_channels} values each, got {len(mean)} and {len(std)}")
        self.backbone = backbone
        self.arch = arch
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        # Not persistent: the state_dict is the backbone's alone (plain torchvision names);
        # mean/std travel in the config.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def config(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "image_size": self.image_size, "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K] logits f(x) for images x in [0, 1]."""
        return self(x)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B] log p(y|x)."""
        return log_prob_from_logits(self(x), y)

    def realness(self, x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
        """[B] D(x, y) in (0, 1): "sigmoid" = sigmoid(f_y(x)) (released code), "softmax" = p(y|x) (paper)."""
        return realness_from_logits(self(x), y, kind)

    def energy(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """[B] E(x, y) = -f_y(x), or E(x) = -logsumexp_k f_k(x) when y is None."""
        logits = self(x).float()
        if y is None:
            return -torch.logsumexp(logits, dim=1)
        return -logits.gather(1, y.view(-1, 1)).squeeze(1)


# ----------------------------------------------------------------------------- small ResNet

def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: outputs do not depend on the rest of the batch, so attacks are
    # per-example, train and eval modes agree, and DDP with any split equals one process.
    return nn.GroupNorm(min(8, channels), channels)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _group_norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _group_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    """A ResNet for 28/32-pixel images: 3x3 stride-2 stem, three stages of basic blocks
    (widths w, 2w, 4w; the last two downsample), global average pool, linear head.
    Width 16 has 78k parameters; batch 64 at 32x32 forward+backward takes ~40 ms on one core."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = SMALL_WIDTH, blocks: tuple[int, ...] = (1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 2, 1, bias=False)
        self.bn1 = _group_norm(width)
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages.append(nn.Sequential(*[_BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------- building

def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise UserInputError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")


def _default_stats(arch: str, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if arch == "resnet_small":
        return (SMALL_MEAN,) * in_channels, (SMALL_STD,) * in_channels
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,) * in_channels, (sum(IMAGENET_STD) / 3,) * in_channels


def build_joint_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 64,
                      mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                      width: int | None = None) -> JointModel:
    """A randomly initialised JointModel. torchvision `resnet50` / `wide_resnet50_2` keep their
    standard definitions (7x7 stem, max-pool) and take 64x64 inputs directly (docs/method.md §2);
    `resnet_small` is SmallResNet for 28/32-pixel images with 1 or 3 channels."""
    _check_arch(arch)
    if int(num_classes) < 2:
        raise UserInputError(f"num_classes {num_classes}: need at least 2 classes")
    if in_channels not in (1, 3):
        raise UserInputError(f"in_channels {in_channels}: must be 1 or 3")
    if width is not None and (arch != "resnet_small" or width < 1):
        raise UserInputError(f"--width {width}: only for resnet_small, and at least 1")
    if arch == "resnet_small":
        backbone = SmallResNet(num_classes, in_channels, width=width or SMALL_WIDTH)
    else:
        import torchvision

        backbone = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            backbone.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    d_mean, d_std = _default_stats(arch, in_channels)
    return JointModel(backbone, arch, num_classes, in_channels, image_size,
                      tuple(mean) if mean is not None else d_mean, tuple(std) if std is not None else d_std)


# ----------------------------------------------------------------------------- saving

def save_joint_model(model: JointModel, path: str | os.PathLike, extra: dict | None = None,
                     overwrite: bool = False) -> Path:
    """Writes the backbone's weights with the model config (and `extra`, provenance) in cmboost's
    checkpoint header. Atomic; refuses to overwrite unless asked."""
    model = getattr(model, "module", model)  # a DDP wrapper saves its module
    return save_checkpoint(path, model.backbone.state_dict(), FORMAT, FORMAT_VERSION, model.config(), extra,
                           overwrite=overwrite)


def read_metadata(path: str | os.PathLike) -> dict:
    """The config and extra dicts of one of our safetensors files ({} for other files)."""
    checkpoint = read_checkpoint(path, FORMAT, FORMAT_VERSION, tensors=False, foreign_ok=True)
    out = {"config": checkpoint.config} if checkpoint.format else {}
    if checkpoint.info:
        out["extra"] = checkpoint.info
    return out


# ----------------------------------------------------------------------------- loading

def _infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    if "layer1.0.conv3.weight" in state:  # bottleneck blocks: resnet50 family
        width = state["layer1.0.conv1.weight"].shape[0] if "layer1.0.conv1.weight" in state else 64
        return "wide_resnet50_2" if width == 128 else "resnet50"
    if "layer1.0.conv2.weight" in state and "layer1.0.bn1.weight" in state and "conv1.weight" in state:
        if state["conv1.weight"].shape[-1] == 3:
            return "resnet_small"
    return None


def load_joint_model(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
                     image_size: int | None = None) -> JointModel:
    """Loads any supported checkpoint into a JointModel in eval mode, on CPU.
    `arch` and `num_classes` are read from our metadata or inferred from the weights when None."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":  # ours, or bare weights another tool saved as safetensors
        checkpoint = read_checkpoint(path, FORMAT, FORMAT_VERSION, foreign_ok=True)
        raw, config = checkpoint.tensors, checkpoint.config
    else:
        raw, config = find_state_dict(torch_load(path), path), {}
    state, facts = strip_layout(raw)
    if arch is not None:
        _check_arch(arch)
        if config.get("arch") not in (None, arch):
            raise UserInputError(f"{path}: holds a {config['arch']} model, not --arch {arch}")
    arch = arch or config.get("arch") or _infer_arch(state)
    if arch is None:
        raise UserInputError(f"{path}: cannot tell the architecture from its keys "
                             f"({describe_keys(list(state))}); pass --arch")
    fc = state.get("fc.weight")
    if num_classes is None:
        num_classes = config.get("num_classes") or (fc.shape[0] if fc is not None else None)
        if num_classes is None:
            raise UserInputError(f"{path}: no fc.weight to read the number of classes from; pass it")
    conv1 = state.get("conv1.weight")
    in_channels = config.get("in_channels") or (conv1.shape[1] if conv1 is not None else 3)
    if in_channels not in (1, 3):
        raise UserInputError(f"{path}: conv1 takes {in_channels} channels; only 1 or 3 are supported")
    size = image_size or config.get("image_size") or (32 if arch == "resnet_small" else 64)
    mean = config.get("mean") or facts.get("mean")
    std = config.get("std") or facts.get("std")
    # resnet_small's width is read off its stem, so wider networks need no extra metadata.
    width = int(conv1.shape[0]) if arch == "resnet_small" and conv1 is not None else None
    model = build_joint_model(arch, int(num_classes), int(in_channels), int(size), mean, std, width)
    _load_into(model.backbone, state, arch, path)
    return model.eval()


def _load_into(backbone: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    check_fits(backbone.state_dict(), state, path, f"arch {arch}")
    backbone.load_state_dict(state, strict=True)
