"""A domain feature network for small datasets (Fashion-MNIST), where Inception features mean little.

It must stay independent of the joint classifier-discriminator it helps judge (a small ResNet
trained adversarially): no residual connections, its own seed, and ordinary cross-entropy training
(no adversarial examples). Five architecture families (`DomainNetConfig.arch`): "vgg", a plain stack
of 3x3 conv + BatchNorm + ReLU with max pooling (the shipped "fmnist" net); "allconv", an
all-convolutional net (Springenberg et al.) with strided convolutions instead of pooling, GELU and
global average pooling ("fmnist-allconv"); "resnet", BatchNorm basic blocks ("fmnist-resnet");
"shallow", three wide large-kernel convolutions with GroupNorm, ELU and average pooling; and "mixer",
an MLP-Mixer over 4x4 patches with no convolution after the patch embedding. The last two were built
as tuning candidates sharing no design with the reporting judges; both fail the judge check's
transfer test, so they tune nothing. Its 256-d
penultimate layer gives the FID / precision-recall features and its softmax the Inception-Score
predictions. It has no spatial feature map for sFID.

Checkpoints are cmboost checkpoints (format "domain_net"): the config, and how the net was trained.
Training resumes per epoch: every epoch's data order, augmentation and dropout depend only on
(seed, epoch), so a rerun of the same command picks up where the last finished epoch left it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmboost.errors import UserInputError
from cmboost.files.checkpoints import check_fits, read_checkpoint, save_checkpoint

FORMAT, FORMAT_VERSION = "domain_net", 2  # version 1: the header before cmboost.files.checkpoints (the shipped nets)
DEFAULT_SEED = 60221  # distinct from the joint network's seeds; recorded in the checkpoint
ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"fmnist": ASSETS / "fmnist_features.safetensors",
           "fmnist-allconv": ASSETS / "fmnist_features_allconv.safetensors",
           "fmnist-resnet": ASSETS / "fmnist_features_resnet.safetensors",
           "fmnist-robust": ASSETS / "fmnist_features_robust.safetensors",
           "fmnist-attacker": ASSETS / "fmnist_features_attacker.safetensors",
           "fmnist-shallow": ASSETS / "fmnist_features_shallow.safetensors",
           "fmnist-mixer": ASSETS / "fmnist_features_mixer.safetensors",
           "fmnist-tune-allconv": ASSETS / "fmnist_features_tune_allconv.safetensors",
           "fmnist-tune-resnet": ASSETS / "fmnist_features_tune_resnet.safetensors"}
ARCHS = ("vgg", "allconv", "resnet", "shallow", "mixer")


@dataclasses.dataclass(frozen=True)
class DomainNetConfig:
    in_channels: int = 1
    image_size: int = 32          # what the net sees; must be a multiple of 16
    pad_from: int | None = 28     # square inputs of this size are zero-padded to image_size
    widths: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 256
    num_classes: int = 10
    mean: float = 0.5
    std: float = 0.5
    dropout: float = 0.3
    dataset: str = "fmnist"
    arch: str = "vgg"             # see ARCHS; configs saved before this field existed are "vgg"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserInputError(f"domain net arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.image_size % 16 or self.image_size < 16:
            raise UserInputError(f"domain net image size {self.image_size}: must be a multiple of 16")
        if len(self.widths) != 4:
            raise UserInputError(f"domain net widths {self.widths}: need 4 stage widths")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "DomainNetConfig":
        try:
            raw = json.loads(text)
            raw["widths"] = tuple(raw["widths"])
            return cls(**raw)
        except UserInputError as err:  # a ValueError too: a field out of range, not a broken file
            raise UserInputError(f"{source}: {err}") from None
        except (ValueError, TypeError, KeyError) as err:
            raise UserInputError(f"{source}: unreadable domain-net config ({err})") from None


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _vgg_body(config: DomainNetConfig) -> tuple[nn.Sequential, int]:
    """conv@S, pool, conv@S/2, pool, 2 x conv@S/4, pool, conv@S/8, pool, flatten."""
    w0, w1, w2, w3 = config.widths
    body = nn.Sequential(
        *_conv(config.in_channels, w0), nn.MaxPool2d(2),
        *_conv(w0, w1), nn.MaxPool2d(2),
        *_conv(w1, w2), *_conv(w2, w2), nn.MaxPool2d(2),
        *_conv(w2, w3), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    side = config.image_size // 16
    return body, w3 * side * side


def _gconv(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


def _allconv_body(config: DomainNetConfig) -> tuple[nn.Sequential, int]:
    """All-convolutional (Springenberg et al.): 5x5 conv@S (w0), stride-2 3x3 conv and 3x3 conv@S/2
    (w1), stride-2 3x3 conv and 3x3 conv@S/4 (w2), 1x1 conv (w3), global average pool; each conv
    + BatchNorm + GELU; no pooling layers, no residuals."""
    w0, w1, w2, w3 = config.widths
    body = nn.Sequential(
        *_gconv(config.in_channels, w0, 5),
        *_gconv(w0, w1, 3, stride=2), *_gconv(w1, w1, 3),
        *_gconv(w1, w2, 3, stride=2), *_gconv(w2, w2, 3),
        *_gconv(w2, w3, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return body, w3


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm with a skip (a 1x1 strided conv where the shape changes), SiLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.skip(x))


def _resnet_body(config: DomainNetConfig) -> tuple[nn.Sequential, int]:
    """A small residual net with BatchNorm and SiLU (the joint network is a GroupNorm ResNet): 3x3
    conv@S (w0), a basic block at S, then one strided basic block per stage (w1@S/2, w2@S/4,
    w3@S/8), global average pool."""
    w0, w1, w2, w3 = config.widths
    body = nn.Sequential(
        nn.Conv2d(config.in_channels, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.SiLU(),
        _BasicBlock(w0, w0, 1), _BasicBlock(w0, w1, 2), _BasicBlock(w1, w2, 2), _BasicBlock(w2, w3, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return body, w3


def _shallow_body(config: DomainNetConfig) -> tuple[nn.Sequential, int]:
    """Three wide convolutions with large kernels: 5x5 conv@S (w1), 2x2 average pool, 5x5 conv@S/2 (w2),
    average pool, 3x3 conv@S/4 (w3), global average pool; each conv + GroupNorm (8 groups) + ELU.
    Few layers, wide receptive fields early, no BatchNorm and no max pooling: a design unlike the
    reporting judges' (the tuning candidate fmnist-shallow)."""
    _, w1, w2, w3 = config.widths

    def conv(cin: int, cout: int, kernel: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(8, cout), nn.ELU()]

    body = nn.Sequential(*conv(config.in_channels, w1, 5), nn.AvgPool2d(2), *conv(w1, w2, 5), nn.AvgPool2d(2),
                         *conv(w2, w3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, w3


class _MixerBlock(nn.Module):
    """One MLP-Mixer block: an MLP across the patches (per channel), then one across the channels
    (per patch), each after a LayerNorm and with a skip."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, tokens, dim]
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class _MixerBody(nn.Module):
    """4x4 patches embedded linearly to w2 channels, 4 Mixer blocks (token MLP hidden w2, channel MLP
    hidden w3), LayerNorm, mean over patches (the tuning candidate fmnist-mixer: no convolution to share)."""

    PATCH = 4
    BLOCKS = 4

    def __init__(self, config: DomainNetConfig):
        super().__init__()
        _, _, w2, w3 = config.widths
        tokens = (config.image_size // self.PATCH) ** 2
        self.embed = nn.Conv2d(config.in_channels, w2, self.PATCH, stride=self.PATCH)  # a linear map per patch
        self.blocks = nn.Sequential(*[_MixerBlock(tokens, w2, w2, w3) for _ in range(self.BLOCKS)])
        self.norm = nn.LayerNorm(w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [N, patches, w2]
        return self.norm(self.blocks(tokens)).mean(dim=1)


def _mixer_body(config: DomainNetConfig) -> tuple[nn.Module, int]:
    return _MixerBody(config), config.widths[2]


BODIES = {"vgg": _vgg_body, "allconv": _allconv_body, "resnet": _resnet_body, "shallow": _shallow_body,
          "mixer": _mixer_body}


class DomainNet(nn.Module):
    """A conv body (`config.arch`: see BODIES), then a linear+BN+act feature layer
    (ReLU for vgg, GELU for the others) and a linear classifier. Input: float images in [0, 1]."""

    def __init__(self, config: DomainNetConfig):
        super().__init__()
        self.config = config
        self.body, flat = BODIES[config.arch](config)
        act = nn.ReLU(inplace=True) if config.arch == "vgg" else nn.GELU()
        self.feature = nn.Sequential(nn.Linear(flat, config.feature_dim, bias=False),
                                     nn.BatchNorm1d(config.feature_dim), act)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.feature_dim, config.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, feature_dim], logits [N, num_classes])."""
        x = (x - self.config.mean) / self.config.std
        features = self.feature(self.body(x))
        return features, self.classifier(self.dropout(features))


def prepare_images(images_u8: torch.Tensor, config: DomainNetConfig) -> torch.Tensor:
    """uint8 NCHW -> float [0, 1] at the net's size (28 -> 32 zero padding, like data.pad_to)."""
    x = images_u8.float() / 255.0
    size = x.shape[-1]
    if size != config.image_size:
        pad = config.image_size - size
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return x


def check_input_shape(shape: tuple[int, ...], config: DomainNetConfig, source: str, net_name: str) -> None:
    """Raises UserInputError unless CHW `shape` is what the net takes (or its pad_from size)."""
    c, h, w = (int(v) for v in shape)
    sizes = {config.image_size} | ({config.pad_from} if config.pad_from else set())
    if c != config.in_channels or h != w or h not in sizes:
        accepted = " or ".join(f"{config.in_channels}x{s}x{s}" for s in sorted(sizes))
        raise UserInputError(f"{source}: images are {c}x{h}x{w} (CxHxW) but the {net_name} feature net "
                             f"takes {accepted}")


# ----------------------------------------------------------------------------- checkpoints


def save_domain_net(path: str | os.PathLike, net: DomainNet, info: dict[str, str] | None = None,
                    overwrite: bool = False) -> Path:
    """Atomic cmboost checkpoint with the net's config and `info` (provenance, values as strings)."""
    info = {k: str(v) for k, v in (info or {}).items()}
    return save_checkpoint(path, net.state_dict(), FORMAT, FORMAT_VERSION, dataclasses.asdict(net.config), info,
                           overwrite=overwrite)


def resolve_domain_net_path(spec: str | os.PathLike) -> Path:
    """A shipped name ("fmnist") or a path to a safetensors checkpoint."""
    if str(spec) in SHIPPED:
        path = SHIPPED[str(spec)]
        if not path.is_file():
            raise UserInputError(f"{path}: the shipped {spec} feature net is missing from this installation")
        return path
    path = Path(spec)
    if not path.is_file():
        raise UserInputError(f"--features {spec}: not 'inception', not a shipped net ({', '.join(SHIPPED)}), "
                             "and no such file")
    return path


def load_domain_net(spec: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[DomainNet, dict[str, str]]:
    """(net in eval mode on `device`, its info: how it was trained) from a shipped name or a checkpoint path."""
    path = resolve_domain_net_path(spec)
    checkpoint = read_checkpoint(path, FORMAT, FORMAT_VERSION)
    config = DomainNetConfig.from_json(json.dumps(checkpoint.config), str(path))
    net = DomainNet(config)
    check_fits(net.state_dict(), checkpoint.tensors, path, "the domain net its config describes")
    net.load_state_dict(checkpoint.tensors, strict=True)
    return net.to(device).eval(), dict(checkpoint.info)


# ----------------------------------------------------------------------------- training


