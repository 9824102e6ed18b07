"""Feature extractors: uint8 NCHW images in, per-image features out.

Every extractor returns a dict with
- "pool":    float32 [N, D]  features for FID and precision/recall,
- "logits":  float32 [N, K]  class logits whose softmax feeds the Inception Score, or None when
  the network has no classifier (then `logits_reason` says why, and IS is reported as missing),
- "spatial": float32 [N, S]  features for sFID, or None when the network defines none
  (then `spatial_reason` says why, and sFID is reported as missing, never faked).

Three kinds:
- Inception-v3 of the protocol (docs/method.md §6), torch-fidelity's port of the TF 2015-12-05 graph.
  Pool = the 2048-d pool_3 features; logits = pool_3 times the softmax weights without bias (the
  guided-diffusion evaluator's softmax input, torch-fidelity's "logits_unbiased", 1008 classes);
  spatial = the first 7 channels of mixed_6/conv, 17x17x7 = 2023-d in TF's HWC order. The port's
  features_list offers no mixed_6/conv, but the port has the layer: mixed_6 is its Mixed_6d block
  and mixed_6/conv that block's branch1x1 (1x1 conv + BN + ReLU, 192 channels at 17x17), so it
  is read from there. The TF resize to 299 (legacy bilinear, align_corners=False) is done as two
  batched matrix products, equal to torch-fidelity's resize up to float rounding.
- DINOv2 ViT-L/14 (dinov2.py) for FD_DINOv2: pool = the 1024-d CLS token; no logits (None), so
  no IS, and no spatial map.
- A domain network (domain_net.py) for small datasets: pool = its feature layer, no spatial map.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import torch

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_open
from cmboost.files.checkpoints import torch_load, weights_digest
from cmboost.metrics._inception_port import build_port, fidelity_inception
from cmboost.metrics.dinov2 import (DINOV2_FILE, DINOV2_IDENTITY, DINOV2_SIZE, DINOV2_URL, ViTConfig, load_dinov2,
                                    preprocess, random_dinov2)
from cmboost.metrics.domain_net import check_input_shape, load_domain_net, prepare_images
from cmboost.metrics.effnet import EffNetLite0Features
from cmboost.metrics.extractor import FeatureExtractor, check_resizable  # noqa: F401 (the registry's base)
from cmboost.metrics.judges import DEFAULT_FEATURES
from cmboost.records import FEATURE_PRECISION
from cmboost.runtime import autocast, resolve_device, resolve_precision

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
INCEPTION_IDENTITY = "inception-v3-tf-2015-12-05"
INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 channels of mixed_6/conv: 17 * 17 * 7 = 2023

# Inception-v3 blocks in graph order; mixed_6 (Mixed_6d) is where the sFID features branch off.
_BEFORE_MIXED_6 = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                   "Mixed_6c")
_FROM_MIXED_6 = ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def tf1_bilinear_matrix(in_size: int, out_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[out, in] interpolation matrix of TF 1.x resize_bilinear with align_corners=False
    (source coordinate = dst * in/out, no half-pixel offset; the upper neighbour clamps at the edge)."""
    scale = in_size / out_size
    grid = torch.arange(out_size, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)
    lo = grid.long()
    hi = (lo + 1).clamp_max(in_size - 1)
    frac = grid - lo.float()
    matrix = torch.zeros(out_size, in_size, dtype=torch.float32)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(device)


def tf1_resize(x: torch.Tensor, size: int, cache: dict | None = None) -> torch.Tensor:
    """Float NCHW -> NCHW at size x size with the TF 1.x bilinear rule, as A_h @ x @ A_w^T."""
    h, w = x.shape[-2:]
    cache = {} if cache is None else cache
    key_h, key_w = (h, size, x.device), (w, size, x.device)
    if key_h not in cache:
        cache[key_h] = tf1_bilinear_matrix(h, size, x.device)
    if key_w not in cache:
        cache[key_w] = tf1_bilinear_matrix(w, size, x.device)
    return torch.matmul(cache[key_h], torch.matmul(x, cache[key_w].T))


# ----------------------------------------------------------------------------- Inception


def resolve_weights(file: str, url: str, flag: str, what: str, path: str | os.PathLike | None = None,
                    allow_download: bool = True, env_may_name_file: bool = False) -> Path:
    """A weights file named `file`: `path` (a file, or a folder holding it), else $CMBOOST_WEIGHTS
    (a folder holding it; or, where `env_may_name_file`, the .pth file itself), else torch's hub
    cache (where torch.hub and torch-fidelity keep it), else a download from `url` into that cache
    when the internet is reachable (not when $CMBOOST_OFFLINE is set). Raises one line naming the
    file and where to put it."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if path:
        given = Path(path)
        found = given / file if given.is_dir() else given
        if not found.is_file():
            raise UserInputError(f"{flag} {path}: no such file (expected {file}; download it from {url})")
        return found
    places = []
    if os.environ.get("CMBOOST_WEIGHTS"):
        env = Path(os.environ["CMBOOST_WEIGHTS"])
        if env.suffix == ".pth":  # a file: it names one network's weights; the others sit beside it
            places.append(env if env_may_name_file or env.name == file else env.parent / file)
        else:
            places.append(env / file)
    places.append(hub / file)
    for place in places:
        if place.is_file():
            return place
    failure = "downloads are off ($CMBOOST_OFFLINE)" if os.environ.get("CMBOOST_OFFLINE") else "no download"
    if allow_download and not os.environ.get("CMBOOST_OFFLINE"):
        try:
            return _download(url, hub / file)
        except OSError as err:
            failure = f"download failed: {getattr(err, 'reason', err)}"
    looked = ", ".join(str(p) for p in places)
    raise UserInputError(f"{what} weights {file} not found (looked in {looked}; {failure}): "
                         f"download {url} and put it in $CMBOOST_WEIGHTS/ or {hub}/, or pass {flag} PATH")


def resolve_inception_weights(path: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """The Inception weights file, found as `resolve_weights` describes ($CMBOOST_WEIGHTS may
    also be the .pth path itself, as before other networks had weights files)."""
    return resolve_weights(INCEPTION_FILE, INCEPTION_URL, "--inception-weights", "Inception", path,
                           allow_download, env_may_name_file=True)


def _download(url: str, target: Path, timeout: float = 60.0) -> Path:
    with atomic_open(target, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    return target


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 (TF 2015-12-05) features of the guided-diffusion protocol. Any image size (resized
    to 299 like the TF graph); grey images are repeated to 3 channels. `channels_last` and bf16
    autocast are speed options on GPU; fp32 is the default for comparable numbers."""

    pool_dim = 2048
    num_classes = 1008
    spatial_dim = 17 * 17 * SPATIAL_CHANNELS

    def __init__(self, port: torch.nn.Module, identity: str = INCEPTION_IDENTITY,
                 device: torch.device | str = "cpu", precision: str = "fp32", channels_last: bool = True):
        self.name = "inception"
        self.identity = identity
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.port = port.to(self.device).eval().requires_grad_(False)
        if channels_last:
            self.port = self.port.to(memory_format=torch.channels_last)
        self._resize_cache: dict = {}

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                     precision: str = "fp32", allow_download: bool = True,
                     channels_last: bool = True) -> "InceptionFeatures":
        port_class = fidelity_inception()  # before any download of weights it could not use
        weights = resolve_inception_weights(path, allow_download)
        state_dict = torch_load(weights)
        if not isinstance(state_dict, dict) or not state_dict:
            raise UserInputError(f"{weights}: holds no state dict")
        try:
            port = build_port(port_class, state_dict)
        except RuntimeError as err:
            raise UserInputError(f"{weights}: does not fit torch-fidelity's Inception-v3 "
                                 f"({str(err).strip().splitlines()[0]})") from None
        return cls(port, INCEPTION_IDENTITY, device, precision, channels_last)

    @classmethod
    def random(cls, seed: int = 0, device: torch.device | str = "cpu", precision: str = "fp32",
               channels_last: bool = True) -> "InceptionFeatures":
        """Random weights (seeded): for speed measurements and tests only; the identity says so."""
        port_class = fidelity_inception()
        torch.manual_seed(seed)
        return cls(build_port(port_class, None), f"{INCEPTION_IDENTITY}-random-{seed}", device, precision,
                   channels_last)

    def check_images(self, shape: tuple[int, ...], source: str) -> None:
        check_resizable(shape, source, "Inception", INCEPTION_SIZE)

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"expected uint8 NCHW images, got {images_u8.dtype} {tuple(images_u8.shape)}")
        x = images_u8.to(self.device, non_blocking=True).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # The graph's own preprocessing, in fp32 whatever the precision: resize, then (x - 128) / 128.
        x = (tf1_resize(x, INCEPTION_SIZE, self._resize_cache) - 128.0) / 128.0
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        port = self.port
        with autocast(self.device, self.precision):
            for name in _BEFORE_MIXED_6:
                x = getattr(port, name)(x)
            spatial = port.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # mixed_6/conv, first 7 channels
            for name in _FROM_MIXED_6:
                x = getattr(port, name)(x)
        pool = torch.flatten(x, 1).float()
        logits = pool @ port.fc.weight.float().T  # "logits_unbiased": the evaluator's softmax has no bias
        spatial = spatial.float().permute(0, 2, 3, 1).reshape(len(pool), -1)  # TF's NHWC flattening
        return {"pool": pool, "logits": logits, "spatial": spatial}


# ----------------------------------------------------------------------------- DINOv2


class DinoV2Features(FeatureExtractor):
    """DINOv2 ViT-L/14 CLS features for FD_DINOv2 (metrics/dinov2.py): any image size, grey repeated
    to RGB, resized to 224. No logits and no spatial map, so IS and sFID are n/a with these alone."""

    num_classes = 0
    spatial_dim = None
    spatial_reason = "DINOv2 features have no spatial map; sFID is defined on Inception's mixed_6/conv"
    logits_reason = "DINOv2 features have no classifier; IS needs class probabilities (list inception first)"

    def __init__(self, model, identity: str, device: torch.device | str = "cpu", precision: str = "fp32"):
        self.name = "dinov2"
        self.identity = identity
        self.device = torch.device(device)
        self.precision = precision
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.pool_dim = model.config.dim

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                     precision: str = "fp32", allow_download: bool = True) -> "DinoV2Features":

        weights = resolve_weights(DINOV2_FILE, DINOV2_URL, "--dinov2-weights", "DINOv2", path, allow_download)
        model = load_dinov2(weights)
        c = model.config
        # Only the released ViT-L/14 shape is FD_DINOv2's network; other shapes say what they are.
        identity = DINOV2_IDENTITY if c.is_vitl14 else f"dinov2-vit-{c.dim}x{c.depth}-p{c.patch}-g{c.grid}"
        return cls(model, identity, device, precision)

    @classmethod
    def random(cls, seed: int = 0, device: torch.device | str = "cpu", precision: str = "fp32",
               config=None) -> "DinoV2Features":
        """Random weights (seeded): for speed measurements and tests only; the identity says so."""

        return cls(random_dinov2(config or ViTConfig(), seed), f"{DINOV2_IDENTITY}-random-{seed}", device, precision)

    def check_images(self, shape: tuple[int, ...], source: str) -> None:
        check_resizable(shape, source, "DINOv2", DINOV2_SIZE)

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"expected uint8 NCHW images, got {images_u8.dtype} {tuple(images_u8.shape)}")
        x = preprocess(images_u8.to(self.device, non_blocking=True))  # fp32 whatever the precision
        with autocast(self.device, self.precision):
            pool = self.model(x)
        return {"pool": pool.float(), "logits": None, "spatial": None}


# ----------------------------------------------------------------------------- domain networks


class DomainFeatures(FeatureExtractor):
    """A domain_net.DomainNet: its feature layer for FID/PR, its logits for IS, no spatial map."""

    spatial_dim = None

    def __init__(self, net, name: str, device: torch.device | str = "cpu", precision: str = "fp32"):
        # channels-last: about 2x faster for these narrow convolutions on CPU (benchmarks/features_speed.py)
        self.net = net.to(device).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.name = str(name)
        self.identity = f"domain-net-{weights_digest(self.net)}"
        self.device = torch.device(device)
        self.precision = precision
        self.pool_dim = net.config.feature_dim
        self.num_classes = net.config.num_classes
        self.spatial_reason = (f"the {self.name} feature net has no spatial feature map; "
                               "sFID is defined on Inception's mixed_6/conv")

    def check_images(self, shape: tuple[int, ...], source: str) -> None:
        check_input_shape(tuple(shape), self.net.config, source, self.name)

    def padded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = (int(v) for v in shape)
        config = self.net.config  # pad_from-sized images are zero-padded to image_size (prepare_images)
        return (c, config.image_size, config.image_size) if h == w == config.pad_from else (c, h, w)

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = prepare_images(images_u8.to(self.device, non_blocking=True), self.net.config)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            features, logits = self.net(x)
        return {"pool": features.float(), "logits": logits.float(), "spatial": None}


def effnet_resolution(spec: str) -> int | None:
    """"effnet-lite0" (its default resolution) or "effnet-lite0@R" (R px, 32 to 512)."""
    if spec == "effnet-lite0":
        return None
    size = spec.removeprefix("effnet-lite0@")
    if spec.startswith("effnet-lite0@") and size.isdigit() and 32 <= int(size) <= 512:
        return int(size)
    raise UserInputError(f"--features {spec}: write effnet-lite0 or effnet-lite0@R with R from 32 to 512 px")


def load_feature_extractor(spec: str = DEFAULT_FEATURES, device: torch.device | str | None = None,
                           precision: str = FEATURE_PRECISION, inception_weights: str | os.PathLike | None = None,
                           allow_download: bool = True,
                           dinov2_weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """`spec`: "inception", "dinov2" (DINOv2 ViT-L/14, metrics/dinov2.py), "effnet-lite0" or
    "effnet-lite0@R" (ImageNet EfficientNet-Lite0 at R px, metrics/effnet.py; weights from $CMBOOST_EFFNET_WEIGHTS or the
    `cmboost[judges]` package), a shipped domain net ("fmnist"), or a domain-net checkpoint path.
    Precision defaults to fp32 (comparable numbers); "bf16", or "auto" (runtime.resolve_precision: bf16
    on GPU), for speed."""
    if isinstance(spec, FeatureExtractor):
        return spec
    device = resolve_device(device if not isinstance(device, torch.device) else str(device))
    precision = resolve_precision(precision, device)
    if spec == "inception":
        return InceptionFeatures.from_weights(inception_weights, device, precision, allow_download)
    if spec == "dinov2":
        return DinoV2Features.from_weights(dinov2_weights, device, precision, allow_download)
    if str(spec).startswith("effnet-lite0"):
        return EffNetLite0Features.from_weights(None, device, precision, effnet_resolution(str(spec)))
    net, _ = load_domain_net(spec, device)
    return DomainFeatures(net, str(spec), device, precision)
