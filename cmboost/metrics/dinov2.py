"""DINOv2 ViT-L/14 features for FD_DINOv2 (Stein et al. 2023, dgm-eval; used by EDM2).

The convention of EDM2's calculate_metrics.py (which follows dgm-eval): uint8 RGB -> float
0..255 -> bicubic resize to 224x224 (antialiased, torch's interpolate) -> /255 -> ImageNet
mean/std -> the ViT's final-norm CLS token, 1024-d. No classifier, no spatial map: IS and sFID are
not defined for these features.

The network is written here (torch-fidelity 0.4's DINOv2 extractor builds it through torch.hub,
which needs the internet and the facebookresearch/dinov2 code, refuses local weight files, and
resizes with TF1 bilinear instead of bicubic). It loads the official state dict
`dinov2_vitl14_pretrain.pth` as it is: its parameter names are used unchanged. The architecture
of ViT-L/14 as released: patch 14, width 1024, 24 pre-norm blocks with 16 heads, layer-scale on
both residual branches, MLP ratio 4 with exact GELU, LayerNorm eps 1e-6, biases everywhere, and
position embeddings for a 37x37 patch grid (518 px) plus the CLS token. At 224 px the grid is
16x16, so the patch position embeddings are resized bicubically the way DINOv2 does it: with a
scale factor of (16 + 0.1) / 37 rather than an output size, which changes the sampling positions
slightly, and so the features. The width, depth and grid are read from the state dict, so smaller
configurations (tests) load the same way; the head width is 64 in every DINOv2 ViT.

Not verified here: no real DINOv2 weights could be downloaded where this was written, so the
match with EDM2's FD_DINOv2 numbers rests on following the published architecture and
preprocessing; only random weights were run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cmboost.errors import UserInputError

DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2_FILE
DINOV2_IDENTITY = "dinov2-vitl14-lvd142m"
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64
POS_OFFSET = 0.1  # DINOv2's interpolation offset (interpolate_offset)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    dim: int = 1024
    depth: int = 24
    patch: int = 14
    grid: int = 37           # patches per side the position embeddings were trained for (518 / 14)
    mlp_hidden: int = 4096

    @property
    def heads(self) -> int:
        return self.dim // HEAD_DIM

    @property
    def is_vitl14(self) -> bool:
        return self == ViTConfig()


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=1e-6)
        self.attn = _Attention(config.dim, config.heads)
        self.ls1 = _LayerScale(config.dim)
        self.norm2 = nn.LayerNorm(config.dim, eps=1e-6)
        self.mlp = _Mlp(config.dim, config.mlp_hidden)
        self.ls2 = _LayerScale(config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.dim, kernel_size=config.patch, stride=config.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """The DINOv2 backbone in eval form; forward(normalised images) -> final-norm CLS tokens."""

    def __init__(self, config: ViTConfig = ViTConfig()):
        super().__init__()
        self.config = config
        self.patch_embed = _PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid ** 2 + 1, config.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, config.dim))  # training-only, kept so the file loads strictly
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self._pos_cache: dict = {}

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """[1, 1 + rows*cols, dim]: CLS position plus the patch grid resized like DINOv2's
        interpolate_pos_encoding (float32, bicubic, no antialias, scale factor with the 0.1 offset)."""
        key = (rows, cols, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            grid, dim = self.config.grid, self.config.dim
            pos = self.pos_embed.detach().float()
            if rows == cols == grid:
                resized = pos
            else:
                patches = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
                patches = F.interpolate(patches, mode="bicubic", antialias=False,
                                        scale_factor=((rows + POS_OFFSET) / grid, (cols + POS_OFFSET) / grid))
                if patches.shape[-2:] != (rows, cols):
                    raise ValueError(f"position grid {tuple(patches.shape[-2:])} != {(rows, cols)}")
                resized = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)
            self._pos_cache[key] = resized.to(self.pos_embed.dtype)
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // self.config.patch, x.shape[-1] // self.config.patch
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.position_embedding(rows, cols).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])

    def _apply(self, fn, recurse=True):
        self._pos_cache = {}  # moved or cast: the resized embedding is recomputed from the parameter
        return super()._apply(fn, recurse)


def config_from_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> ViTConfig:
    """The ViT shape a DINOv2 state dict describes; one-line errors for anything else."""
    try:
        dim = int(state_dict["cls_token"].shape[-1])
        patch = int(state_dict["patch_embed.proj.weight"].shape[-1])
        tokens = int(state_dict["pos_embed"].shape[1]) - 1
        hidden = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    except (KeyError, AttributeError, IndexError) as err:
        if "blocks.0.mlp.w12.weight" in state_dict:
            raise UserInputError(f"{source}: a DINOv2 ViT-g (SwiGLU) state dict; FD_DINOv2 uses ViT-L/14") from None
        raise UserInputError(f"{source}: not a DINOv2 backbone state dict (no {err})") from None
    if "register_tokens" in state_dict:
        raise UserInputError(f"{source}: a DINOv2 'with registers' model; FD_DINOv2 uses the plain ViT-L/14")
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    grid = math.isqrt(tokens)
    if grid * grid != tokens or dim % HEAD_DIM:
        raise UserInputError(f"{source}: pos_embed of {tokens} patches / width {dim} is not a DINOv2 ViT")
    return ViTConfig(dim=dim, depth=depth, patch=patch, grid=grid, mlp_hidden=hidden)


def load_dinov2(path: str | os.PathLike) -> DinoViT:
    """A DinoViT from a weights file, read with torch.load(weights_only=True)."""
    path = Path(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many classes
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserInputError(f"{path}: not a weights-only PyTorch state dict ({type(err).__name__}: {first})") from None
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserInputError(f"{path}: holds no state dict")
    state_dict = {key.removeprefix("backbone."): value for key, value in state_dict.items()}
    model = DinoViT(config_from_state_dict(state_dict, str(path)))
    state_dict.setdefault("mask_token", model.mask_token.detach().clone())
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise UserInputError(f"{path}: does not fit the DINOv2 ViT "
                             f"({' '.join(str(err).split())[:300]})") from None
    return model


def random_dinov2(config: ViTConfig = ViTConfig(), seed: int = 0) -> DinoViT:
    """Seeded random weights (tests, speed): ViT-style init, layer-scale 1e-5 as DINOv2 starts."""
    generator = torch.Generator().manual_seed(seed)
    model = DinoViT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1e-5)
            elif param.ndim >= 2 or name in ("cls_token", "pos_embed"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return model


def preprocess(images_u8: torch.Tensor, size: int = DINOV2_SIZE) -> torch.Tensor:
    """uint8 NCHW (grey or RGB) -> the normalised float32 224x224 RGB batch DINOv2 takes."""
    x = images_u8.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
