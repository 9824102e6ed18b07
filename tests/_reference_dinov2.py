"""The pre-timm DINOv2 ViT of cmboost/metrics/dinov2.py (hand-written from the released
architecture, the official state-dict names), kept as the reference that timm's vit_*_dinov2 wrapper
is compared with (tests/test_metrics_dinov2.py). Trimmed to the network, its position-embedding
resize (DINOv2's scale factor with the 0.1 offset), its preprocessing and its seeded random weights."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64
POS_OFFSET = 0.1


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    dim: int = 1024
    depth: int = 24
    patch: int = 14
    grid: int = 37
    mlp_hidden: int = 4096

    @property
    def heads(self) -> int:
        return self.dim // HEAD_DIM


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
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
    """forward(normalised images) -> final-norm CLS tokens."""

    def __init__(self, config: ViTConfig = ViTConfig()):
        super().__init__()
        self.config = config
        self.patch_embed = _PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid ** 2 + 1, config.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, config.dim))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        grid, dim = self.config.grid, self.config.dim
        pos = self.pos_embed.detach().float()
        if rows == cols == grid:
            return pos
        patches = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, mode="bicubic", antialias=False,
                                scale_factor=((rows + POS_OFFSET) / grid, (cols + POS_OFFSET) / grid))
        return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2] // self.config.patch, x.shape[-1] // self.config.patch
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.position_embedding(rows, cols).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])


def random_dinov2(config: ViTConfig = ViTConfig(), seed: int = 0) -> DinoViT:
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


def preprocess(images_u8: torch.Tensor, size: int = 224) -> torch.Tensor:
    x = images_u8.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
