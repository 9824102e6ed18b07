"""DINOv2 ViT-L/14 features for FD_DINOv2 (Stein et al. 2023, dgm-eval; used by EDM2).

EDM2's convention (calculate_metrics.py, after dgm-eval): uint8 RGB -> float 0..255 -> bicubic resize
to 224x224 (antialiased, torch's interpolate) -> /255 -> ImageNet mean/std -> the ViT's final-norm CLS
token, 1024-d; no classifier, no spatial map (no IS, no sFID). The network is timm's
vit_large_patch14_dinov2 for 224 px (smaller shapes, read from the state dict, through its kwargs). The
official `dinov2_vitl14_pretrain.pth` has timm's names; timm_state_dict drops the training-only
mask_token and resizes the position embeddings once from the 37x37 grid (518 px) to 16x16 the way
DINOv2 does, bicubic with a scale factor of (16 + 0.1) / 37 (timm's antialiased resize to a size
samples elsewhere). torch-fidelity's extractor needs torch.hub and resizes with TF1 bilinear. Not
verified here: no real DINOv2 weights could be downloaded where this was written, only random ones run.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from cmboost.errors import UserInputError
from cmboost.files.checkpoints import torch_load
from cmboost.metrics.extractor import create_timm_model

DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2_FILE
DINOV2_IDENTITY = "dinov2-vitl14-lvd142m"
DINOV2_SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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


def build_dinov2(config: ViTConfig = ViTConfig()) -> nn.Module:
    """timm's DINOv2 ViT for 224 px inputs, in eval mode (weights not loaded); forward(normalised
    images) -> final-norm CLS tokens. `model.config` is `config`."""
    model = create_timm_model("vit_large_patch14_dinov2", img_size=DINOV2_SIZE, patch_size=config.patch,
                              embed_dim=config.dim, depth=config.depth, num_heads=config.heads,
                              mlp_ratio=config.mlp_hidden / config.dim, num_classes=0)
    model.config = config
    return model


def resize_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[1, 1 + grid*grid, dim] -> [1, 1 + rows*cols, dim]: the CLS position, then the patch grid resized
    like DINOv2's interpolate_pos_encoding (float32, bicubic, no antialias, scale factor with the offset)."""
    grid, dim = math.isqrt(pos_embed.shape[1] - 1), pos_embed.shape[-1]
    if rows == cols == grid:
        return pos_embed
    pos = pos_embed.detach().float()
    patches = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, mode="bicubic", antialias=False,
                            scale_factor=((rows + POS_OFFSET) / grid, (cols + POS_OFFSET) / grid))
    if patches.shape[-2:] != (rows, cols):
        raise ValueError(f"position grid {tuple(patches.shape[-2:])} != {(rows, cols)}")
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1).to(pos_embed.dtype)


def timm_state_dict(state_dict: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """A DINOv2 backbone state dict (names without `backbone.`) -> build_dinov2(config)'s."""
    rows = DINOV2_SIZE // config.patch
    return {key: resize_pos_embed(value, rows, rows) if key == "pos_embed" else value
            for key, value in state_dict.items() if key != "mask_token"}


def config_from_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> ViTConfig:
    """The ViT shape a DINOv2 state dict describes; one-line errors for anything else."""
    try:
        dim, patch = int(state_dict["cls_token"].shape[-1]), int(state_dict["patch_embed.proj.weight"].shape[-1])
        tokens, hidden = int(state_dict["pos_embed"].shape[1]) - 1, int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
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


def load_dinov2(path: str | os.PathLike) -> nn.Module:
    """build_dinov2's network with the weights of a file (torch.load(weights_only=True), one-line errors)."""
    state_dict = torch_load(path)
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserInputError(f"{path}: holds no state dict")
    state_dict = {key.removeprefix("backbone."): value for key, value in state_dict.items()}
    config = config_from_state_dict(state_dict, str(path))
    model = build_dinov2(config)
    try:
        model.load_state_dict(timm_state_dict(state_dict, config), strict=True)
    except RuntimeError as err:
        raise UserInputError(f"{path}: does not fit the DINOv2 ViT ({' '.join(str(err).split())[:300]})") from None
    return model


def random_dinov2(config: ViTConfig = ViTConfig(), seed: int = 0) -> nn.Module:
    """Seeded random weights (tests, speed): ViT-style init, layer-scale 1e-5 as DINOv2 starts; drawn in the
    released file's layout and order (mask_token after pos_embed, on the trained grid), as before timm."""
    generator, model, shapes = torch.Generator().manual_seed(seed), build_dinov2(config), {}
    for name, param in model.named_parameters():
        shapes[name] = tuple(param.shape)
        if name == "pos_embed":
            shapes.update(pos_embed=(1, config.grid ** 2 + 1, config.dim), mask_token=(1, config.dim))
    state = {}
    for name, shape in shapes.items():
        if len(shape) >= 2 or name in ("cls_token", "pos_embed"):
            state[name] = torch.randn(shape, generator=generator) * 0.02
        else:  # layer scales 1e-5, LayerNorm weights 1, biases 0
            state[name] = torch.full(shape, 1e-5 if name.endswith("gamma") else float(name.endswith("weight")))
    model.load_state_dict(timm_state_dict(state, config), strict=True)
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
