"""Consistency-model checkpoints: OpenAI's .pt files, ours (safetensors + JSON config), diffusers.

Ours: one .safetensors file holding the (EMA) UNet weights; its metadata key "cmboost" is a JSON
object {"format": "cmboost-cm", "kind": "cd"|"ct"|"edm", "unet": {UNetModel kwargs},
"precond": {sigma_data, sigma_min, sigma_max, boundary}, "sampler": {"ts": [...], "N": n},
"image_size", "in_channels", "num_classes", ...}, so `cmboost sample` needs only the file.

OpenAI's: a bare state_dict pickled with torch.save, read with weights_only=True (no code runs).
Only the ImageNet-64 models are supported; the kind (cd or ct) and so the default 2-step
schedule come from the file name (cd_imagenet64_l2.pt, ct_imagenet64.pt) or from --kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from cmboost.atomic import atomic_path
from cmboost.cm.denoiser import DEFAULT_TS, KINDS, Preconditioning, precond_for_kind
from cmboost.cm.unet import IMAGENET64_CONFIG, UNetModel
from cmboost.errors import UserInputError
from cmboost.safetensors_io import read_safetensors

FORMAT = "cmboost-cm"
META_KEY = "cmboost"
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


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomic safetensors write (temp file in the same folder, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


def save_model(path: str | os.PathLike, net: torch.nn.Module, kind: str, unet_config: dict,
               precond: Preconditioning, ts: tuple[int, ...] | None = None, num_levels: int | None = None,
               extra: dict | None = None) -> Path:
    """Exports `net` (usually the EMA weights) with everything `cmboost sample` needs."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {KINDS}")
    config = {
        "format": FORMAT, "version": 1, "kind": kind,
        "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet_config.items()},
        "precond": precond.to_dict(),
        "sampler": {"ts": list(ts) if ts else None, "N": num_levels},
        "image_size": unet_config["image_size"], "in_channels": unet_config["in_channels"],
        "num_classes": unet_config.get("num_classes"),
    }
    config.update(extra or {})
    return save_safetensors(path, net.state_dict(), {META_KEY: json.dumps(config)})


def read_config(path: str | os.PathLike) -> dict:
    _, metadata = read_safetensors(path)
    return _parse_config(Path(path), metadata)


def _parse_config(path: Path, metadata: dict[str, str]) -> dict:
    if META_KEY not in metadata:
        raise UserInputError(f"{path}: no cmboost config in the safetensors metadata (not written by cmboost?)")
    try:
        config = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: damaged cmboost config ({err})") from None
    if config.get("format") != FORMAT or config.get("kind") not in KINDS or "unet" not in config:
        raise UserInputError(f"{path}: not a cmboost consistency-model checkpoint (format {config.get('format')!r})")
    return config


def _build_loaded(build, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """Builds the model on the meta device (no init cost), checks names and shapes, then adopts the
    loaded tensors as its parameters."""
    with torch.device("meta"):
        net = build()
    _check_state(net, state, path)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                        strict=True, assign=True)
    return net


def _check_state(net: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise UserInputError(f"{path}: weights do not fit the model: {', '.join(parts)} keys")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserInputError(f"{path}: {key} has shape {tuple(state[key].shape)}, the model needs {tuple(value.shape)}")


def load_cmboost(path: Path) -> LoadedModel:
    tensors, metadata = read_safetensors(path)
    config = _parse_config(path, metadata)
    net = _build_loaded(lambda: unet_from_config(config["unet"]), tensors, path)
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found; {OPENAI_HINT}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise UserInputError(f"{path}: not a loadable PyTorch state_dict with weights_only=True ({str(err).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{path}: expected a state_dict of tensors")
    unet_config = dict(unet_config or IMAGENET64_CONFIG)
    net = _build_loaded(lambda: unet_from_config(unet_config), state, path)
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
