"""The pre-timm EfficientNet-Lite0 of cmboost/metrics/effnet.py (hand-written from the published
architecture, state-dict names of the converted TF checkpoint), kept as the reference that timm's
efficientnet_lite0 wrapper is compared with (tests/test_metrics_effnet.py). Trimmed to the network,
its preprocessing and the seeded random weights of EffNetLite0Features.random."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM, HEAD, CLASSES = 32, 1280, 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
MEAN, STD = 127.0, 128.0


class _Conv(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding (odd extra pixel at the bottom/right for stride 2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 tf_same: bool = True):
        self.tf_same = tf_same and stride > 1
        super().__init__(cin, cout, kernel, stride, 0 if self.tf_same else kernel // 2, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            pads = []
            for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W, then H
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=BN_MOMENTUM)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, eps: float, tf_same: bool):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _Conv(cin, mid, 1)
            self._bn0 = _bn(mid, eps)
        self._depthwise_conv = _Conv(mid, mid, kernel, stride, groups=mid, tf_same=tf_same)
        self._bn1 = _bn(mid, eps)
        self._project_conv = _Conv(mid, cout, 1)
        self._bn2 = _bn(cout, eps)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """Input: float NCHW already normalised; output (pooled 1280-d features, 1000 ImageNet logits)."""

    def __init__(self, bn_eps: float = BN_EPS, tf_same: bool = True, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = _Conv(3, STEM, 3, 2, tf_same=tf_same)
        self._bn0 = _bn(STEM, bn_eps)
        blocks, cin = [], STEM
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if i == 0 else 1, bn_eps, tf_same))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _Conv(cin, HEAD, 1)
        self._bn1 = _bn(HEAD, bn_eps)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        pool = F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))
        return pool, self._fc(self._dropout(pool))


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The weights EffNetLite0Features.random(seed) drew before timm, in the checkpoint's layout."""
    generator = torch.Generator().manual_seed(seed)
    net = EfficientNetLite0()
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point():
            values = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(values.abs() + 0.5 if name.endswith(("running_var", "bn0.weight", "bn1.weight",
                                                                "bn2.weight")) else values)
    return net.state_dict()


def preprocess(images_u8: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 NCHW -> normalised float NCHW RGB at resolution x resolution."""
    x = images_u8.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    return (x - MEAN) / STD


@torch.no_grad()
def features(net: EfficientNetLite0, images_u8: torch.Tensor, resolution: int) -> dict[str, torch.Tensor]:
    """EffNetLite0Features.__call__ before timm (fp32, CPU, channels-last)."""
    net = net.eval().to(memory_format=torch.channels_last)
    pool, logits = net(preprocess(images_u8, resolution).contiguous(memory_format=torch.channels_last))
    return {"pool": pool, "logits": logits}
