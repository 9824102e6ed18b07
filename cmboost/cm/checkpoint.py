"""Consistency-model checkpoints: OpenAI's .pt files, ours (cmboost checkpoints), diffusers.

Ours: a cmboost checkpoint (cmboost/files/checkpoints.py, format "cm") holding the (EMA) UNet weights;
its config is {"kind": "cd"|"ct"|"edm", "unet": {UNetModel kwargs}, "precond": {sigma_data,
sigma_min, sigma_max, boundary}, "sampler": {"ts": [...], "N": n}, "image_size", "in_channels",
"num_classes"} and its info how it was trained, so `cmboost sample` needs only the file.

OpenAI's: a bare state_dict pickled with torch.save, read with weights_only=True (no code runs).
Only the ImageNet-64 models are supported; the kind (cd or ct) and so the default 2-step
schedule come from the file name (cd_imagenet64_l2.pt, ct_imagenet64.pt) or from --kind.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from cmboost.cm.denoiser import DEFAULT_TS, KINDS, Preconditioning, precond_for_kind
from cmboost.cm.unet import IMAGENET64_CONFIG, UNetModel
from cmboost.errors import UserInputError
from cmboost.files.checkpoints import (Checkpoint, check_fits, find_state_dict, read_checkpoint, save_checkpoint,
                                       torch_load)

FORMAT, FORMAT_VERSION = "cm", 2  # version 1: the single "cmboost" JSON header before cmboost.files.checkpoints
OPENAI_HINT = ("the OpenAI ImageNet-64 checkpoints (cd_imagenet64_l2.pt, cd_imagenet64_lpips.pt, ct_imagenet64.pt) "
               "are linked from the README of github.com/openai/consistency_models "
               "(https://openaipublic.blob.core.windows.net/consistency/<name>.pt)")
UNET_KEYS = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
             "attention_resolutions", "dropout", "channel_mult", "conv_resample", "num_classes",
             "use_checkpoint", "use_fp16", "num_heads", "num_head_channels", "num_heads_upsample",
             "use_scale_shift_norm", "resblock_updown")


@dataclasses.dataclass
class LoadedModel:
    """A network ready for the samplers, with what is needed to sample from it."""

    net: torch.nn.Module
    kind: str                      # "cd", "ct", "edm", or "cm" (an OpenAI consistency model of unknown kind)
    precond: Preconditioning
    ts: tuple[int, ...] | None     # default multistep indices (None: --ts/--N required)
    num_levels: int | None         # N of that grid
    image_size: int
    in_channels: int
    num_classes: int | None
    source: str                    # "cmboost", "openai" or "diffusers"
    config: dict


def unet_from_config(unet_config: dict) -> UNetModel:
    unknown = set(unet_config) - set(UNET_KEYS) - {"attention_impl"}
    if unknown:
        raise UserInputError(f"unknown UNet config keys: {', '.join(sorted(unknown))}")
    cfg = dict(unet_config)
    for key in ("attention_resolutions", "channel_mult"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return UNetModel(**cfg)


def save_model(path: str | os.PathLike, net: torch.nn.Module, kind: str, unet_config: dict,
               precond: Preconditioning, ts: tuple[int, ...] | None = None, num_levels: int | None = None,
               extra: dict | None = None, overwrite: bool = True) -> Path:
    """Exports `net` (usually the EMA weights) with everything `cmboost sample` needs; `extra` is
    provenance. Overwrites by default: a resumed training run exports to the same file again."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
    config = {
        "kind": kind,
        "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet_config.items()},
        "precond": precond.to_dict(),
        "sampler": {"ts": list(ts) if ts else None, "N": num_levels},
        "image_size": unet_config["image_size"], "in_channels": unet_config["in_channels"],
        "num_classes": unet_config.get("num_classes"),
    }
    return save_checkpoint(path, net.state_dict(), FORMAT, FORMAT_VERSION, config, extra, overwrite=overwrite)


def read_config(path: str | os.PathLike) -> dict:
    """The config and the provenance of one of our files, in one dict (the config wins a clash)."""
    return _parse_config(read_checkpoint(path, FORMAT, FORMAT_VERSION, tensors=False))


def _parse_config(checkpoint: Checkpoint) -> dict:
    config = {**checkpoint.info, **checkpoint.config}
    if config.get("kind") not in KINDS or not isinstance(config.get("unet"), dict):
        raise UserInputError(f"{checkpoint.path}: damaged consistency-model config (needs a kind, one of "
                             f"{', '.join(KINDS)}, and a unet)")
    return config


def _build_loaded(build, state: dict[str, torch.Tensor], path: Path, target: str) -> torch.nn.Module:
    """Builds the model on the meta device (no init cost), checks names and shapes, then adopts the
    loaded tensors as its parameters."""
    with torch.device("meta"):
        net = build()
    check_fits(net.state_dict(), state, path, target)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                        strict=True, assign=True)
    return net


def load_cmboost(path: Path) -> LoadedModel:
    checkpoint = read_checkpoint(path, FORMAT, FORMAT_VERSION)
    config = _parse_config(checkpoint)
    net = _build_loaded(lambda: unet_from_config(config["unet"]), checkpoint.tensors, path, "the UNet in its config")
    p = config.get("precond", {})
    precond = Preconditioning(**p) if p else precond_for_kind(config["kind"])
    sampler = config.get("sampler") or {}
    ts = tuple(sampler["ts"]) if sampler.get("ts") else None
    return LoadedModel(net, config["kind"], precond, ts, sampler.get("N"), config["unet"]["image_size"],
                       config["unet"]["in_channels"], config["unet"].get("num_classes"), "cmboost", config)


def openai_kind_from_name(path: Path) -> str | None:
    name = path.name.lower()
    for kind in ("cd", "ct", "edm"):
        if name.startswith(kind + "_") or name.startswith(kind + "-"):
            return kind
    return None


def load_openai(path: Path, kind: str | None = None, unet_config: dict | None = None) -> LoadedModel:
    """An OpenAI state_dict (.pt), loaded with weights_only=True; ImageNet-64 unless `unet_config` says otherwise."""
    # Unknown kind ("cm"): 1-step sampling is the same for CD and CT; 2 steps then need --ts/--N (or --kind).
    kind = kind or openai_kind_from_name(path) or "cm"
    state = find_state_dict(torch_load(path, fix=OPENAI_HINT), path)
    target = "the UNet config given" if unet_config else "OpenAI's ImageNet-64 UNet"
    unet_config = dict(unet_config or IMAGENET64_CONFIG)
    net = _build_loaded(lambda: unet_from_config(unet_config), state, path, target)
    ts, n = DEFAULT_TS.get(kind, (None, None))
    return LoadedModel(net, kind, precond_for_kind(kind), ts, n, unet_config["image_size"], unet_config["in_channels"],
                       unet_config.get("num_classes"), "openai", {"kind": kind, "unet": unet_config})


class _DiffusersUNet(torch.nn.Module):
    """Adapts a diffusers UNet2DModel to forward(x, t, y): diffusers' CM UNets take the same
    rescaled time 250 ln(sigma) and the class label as `class_labels`."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, timesteps, class_labels=y).sample


def load_diffusers(path: Path, kind: str | None) -> LoadedModel:
    """A ConsistencyModelPipeline folder (with unet/config.json). Optional: needs diffusers installed."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UserInputError(f"{path}: a diffusers folder needs the optional package diffusers (pip install diffusers)") from None
    kind = kind or ("ct" if "ct" in path.name.lower().split("_") else "cd" if "cd" in path.name.lower() else None)
    if kind is None:
        raise UserInputError(f"{path}: pass --kind cd|ct for a diffusers model")
    unet = UNet2DModel.from_pretrained(str(path / "unet"))
    cfg = unet.config
    ts, n = DEFAULT_TS.get(kind, (None, None))
    num_classes = getattr(cfg, "num_class_embeds", None)
    return LoadedModel(_DiffusersUNet(unet), kind, precond_for_kind(kind), ts, n, int(cfg.sample_size),
                       int(cfg.in_channels), num_classes, "diffusers", {"kind": kind})


def load_model(path: str | os.PathLike, kind: str | None = None) -> LoadedModel:
    """Dispatches on what `path` is: .safetensors (ours), .pt/.pth (OpenAI), a folder (diffusers)."""
    if kind is not None and kind not in KINDS:
        raise UserInputError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"--model {path}: file not found. Train one with 'cmboost train-cm'; {OPENAI_HINT}")
    if path.is_dir():
        if (path / "unet" / "config.json").is_file():
            return load_diffusers(path, kind)
        raise UserInputError(f"--model {path}: a folder, but not a diffusers pipeline (no unet/config.json)")
    if path.suffix == ".safetensors":
        loaded = load_cmboost(path)
        if kind is not None and kind != loaded.kind:
            raise UserInputError(f"--kind {kind}: {path} is a {loaded.kind} model")
        return loaded
    if path.suffix in (".pt", ".pth"):
        return load_openai(path, kind)
    raise UserInputError(f"--model {path}: expected a .safetensors (cmboost), .pt (OpenAI) file or a diffusers folder")
