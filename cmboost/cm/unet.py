"""The ADM UNet (Dhariwal & Nichol 2021) in the form OpenAI's consistency models use.

The constructor takes OpenAI's argument names and, for the ImageNet-64 configuration
(`IMAGENET64_CONFIG`), produces a state_dict whose names and shapes equal those of
cd_imagenet64_l2.pt / cd_imagenet64_lpips.pt / ct_imagenet64.pt key for key. The module
layout (Sequential indices, `in_layers`/`emb_layers`/`out_layers`, `qkv`/`proj_out`, ...) is
therefore fixed by the checkpoints, not a free choice.

Attention runs through `F.scaled_dot_product_attention` with the qkv channels laid out as
(three, heads, head_dim), the layout the released weights were trained with (docs/method.md §5).
A slower reference path written like OpenAI's legacy einsum attention is kept for the
benchmark and the tests (`attention_impl="reference"`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint

ATTENTION_IMPLS = ("sdpa", "reference")

# The OpenAI ImageNet-64 consistency models (cd_imagenet64_*.pt, ct_imagenet64.pt):
# 192 channels, mult (1,2,3,4), 3 res blocks, attention at resolutions 32,16,8 (= downsample
# rates 2,4,8), 64 channels per head, scale-shift norm, res-block up/down, learn_sigma off.
IMAGENET64_CONFIG = dict(
    image_size=64, in_channels=3, model_channels=192, out_channels=3, num_res_blocks=3,
    attention_resolutions=(2, 4, 8), dropout=0.0, channel_mult=(1, 2, 3, 4), num_classes=1000,
    use_fp16=False, num_heads=4, num_head_channels=64, num_heads_upsample=-1,
    use_scale_shift_norm=True, resblock_updown=True,
)


def attention_rates(resolutions: Sequence[int], image_size: int) -> tuple[int, ...]:
    """OpenAI's scripts take attention *resolutions* (32,16,8); the model takes downsample rates."""
    return tuple(sorted({image_size // int(r) for r in resolutions}))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) times, in fp32 (the ADM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zeroed(module: nn.Module) -> nn.Module:
    # Output convolutions start at zero so every residual branch starts as the identity.
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """ADM's GroupNorm(32). fp16 is normalised in fp32 (its variance can overflow); bf16 and
    fp32 run natively, since the kernels accumulate in fp32 anyway (bf16-friendly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        if self.weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def normalization(channels: int) -> GroupNorm32:
    # 32 groups as in ADM; tiny test widths (< 32 channels) fall back to a divisor of the width.
    return GroupNorm32(math.gcd(32, channels), channels)


class Upsample(nn.Module):
    """Nearest x2, then an optional 3x3 conv (`conv`, as OpenAI names it)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) or a 2x2 average pool."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("a pooling Downsample cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GN-SiLU-conv, time/label conditioning (FiLM scale-shift when use_scale_shift_norm), GN-SiLU-
    dropout-conv(zero), plus a skip; optionally resamples (up/down) between the first norm and conv."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return grad_checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample after the first norm+SiLU, before the conv (the ADM "BigGAN" block).
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift  # FiLM: GN(h) * (1 + s) + b
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions: x + proj_out(attn(qkv(GN(x)))).

    qkv channels are (three, heads, head_dim): q is the first third of the 3C channels, k the
    second, v the third, each split into heads of head_dim consecutive channels.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, attention_impl: str = "sdpa"):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {attention_impl!r}: choose one of {ATTENTION_IMPLS}")
        self.attention_impl = attention_impl
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return grad_checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
        q, k, v = qkv.unbind(1)  # each [B, heads, head_dim, L]
        if self.attention_impl == "sdpa":
            out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            out = out.transpose(-1, -2)  # [B, heads, head_dim, L]
        else:
            out = reference_attention(q, k, v)
        return x + self.proj_out(out.reshape(b, c, height, width))


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(d)) applied to v, written the way OpenAI's legacy QKV attention does it
    (q and k each scaled by d^-1/4, einsum, softmax in fp32). Inputs [B, heads, d, L]."""
    d = q.shape[-2]
    scale = d ** -0.25
    weight = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bhts,bhcs->bhct", weight, v)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the time/label embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """The ADM UNet with OpenAI's constructor arguments. `attention_resolutions` are downsample
    rates (OpenAI's convention: 2 means attention at image_size/2). forward(x, timesteps, y)."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True,
                 num_classes: int | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 attention_impl: str = "sdpa"):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_fp16 = use_fp16

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, out_channels=ch_out, use_scale_shift_norm=use_scale_shift_norm,
                            use_checkpoint=use_checkpoint, up=up, down=down)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, attention_impl=attention_impl)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]  # channels of every input block output, consumed by the decoder's skips
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), _zeroed(nn.Conv2d(input_ch, out_channels, 3, padding=1)))
        if use_fp16:
            # OpenAI's fp16 path: the torso's convolutions in half precision (norms and linears
            # stay fp32); prefer bf16 autocast instead.
            for part in (self.input_blocks, self.middle_block, self.output_blocks):
                for module in part.modules():
                    if isinstance(module, nn.Conv2d):
                        module.half()

    @property
    def torso_dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x.to(self.torso_dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out_dtype = self.out[2].weight.dtype  # fp32 head under use_fp16; bf16 when the whole model is bf16
        return self.out(h.to(out_dtype)).to(x.dtype)


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switches every AttentionBlock of `model` to "sdpa" or "reference"."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r}: choose one of {ATTENTION_IMPLS}")
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.attention_impl = impl
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
