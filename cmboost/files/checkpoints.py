"""Checkpoint files: cmboost's safetensors header, safe loading of PyTorch files, weight digests.

Every network cmboost saves is one .safetensors file whose string metadata is:

    cmboost.format   "jcd" | "cm" | "domain_net"  what the tensors are
    cmboost.version  "2"                          that format's version, a decimal integer
    cmboost.config   JSON object                  enough to rebuild the network from the file alone
    cmboost.info     JSON object                  provenance (command, training settings, accuracy):
                                                  never needed to load

Files written before this header (version 1) are still read: "format": "cmboost.jcd/1" with
"config" and "extra"; "format": "cmboost.domain_net/1" with "config" and provenance strings; and
"cmboost": {"format": "cmboost-cm", ...} with everything in one object (all of it is the config).

The writer is our own rather than safetensors.save_file, whose header order follows a Rust HashMap
and so changes from one save to the next: here keys are sorted, so the same tensors and metadata
always give the same bytes. PyTorch pickles (.pt/.pth) are only ever read with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Mapping

import torch

from cmboost.errors import OutputExistsError, UserInputError
from cmboost.files.atomic import atomic_open

FORMAT_KEY, VERSION_KEY, CONFIG_KEY, INFO_KEY = "cmboost.format", "cmboost.version", "cmboost.config", "cmboost.info"
DESCRIPTIONS = {"jcd": "joint classifier-discriminator", "cm": "consistency model", "domain_net": "domain feature net"}
_LEGACY_TAGS = {"cmboost.jcd/1": "jcd", "cmboost.domain_net/1": "domain_net"}
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_DTYPE_NAMES.update({getattr(torch, t): n for t, n in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")) if hasattr(torch, t)})


# ----------------------------------------------------------------------------- raw safetensors

def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in C order as a flat uint8 tensor; a uint8 view works for every dtype,
    bf16 included, where numpy has no equivalent."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      overwrite: bool = True) -> Path:
    """Writes a .safetensors file atomically, byte for byte the same for the same input."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {type(value).__name__}")
    # Widest elements first, as safetensors itself does, so each tensor starts aligned to its dtype.
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    with atomic_open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            fh.write(_raw_bytes(tensors[name]).numpy().tobytes())
    return path


def _open_safetensors(path: Path, load_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise UserInputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if load_tensors else {}
    except Exception as err:  # safetensors raises its own SafetensorError for damaged headers
        raise UserInputError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, metadata


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (on CPU) and metadata of any safetensors file; UserInputError naming the file if unreadable."""
    return _open_safetensors(Path(path), load_tensors=True)


# ----------------------------------------------------------------------------- cmboost's header

@dataclasses.dataclass
class Checkpoint:
    """One read checkpoint. `format` and `version` are None for a safetensors file cmboost did not write."""

    path: Path
    format: str | None
    version: int | None
    config: dict
    info: dict
    tensors: dict[str, torch.Tensor]


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], format: str, version: int,
                    config: dict, info: dict | None = None, overwrite: bool = False) -> Path:
    """Writes `tensors` with cmboost's header; refuses to replace an existing file unless `overwrite`."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", format) or int(version) < 1:
        raise ValueError(f"checkpoint format {format!r} version {version!r}: need a lower-case name and a version >= 1")
    metadata = {FORMAT_KEY: format, VERSION_KEY: str(int(version)), CONFIG_KEY: _dump(config)}
    if info:
        metadata[INFO_KEY] = _dump(info)
    return save_safetensors(path, tensors, metadata, overwrite=overwrite)


def _dump(obj: dict) -> str:
    # default=str: provenance may hold paths or numpy scalars; sort_keys: the same bytes every save.
    return json.dumps(obj, sort_keys=True, default=str)


def read_checkpoint(path: str | os.PathLike, format: str, max_version: int, tensors: bool = True,
                    foreign_ok: bool = False) -> Checkpoint:
    """Reads a cmboost checkpoint of `format`, whichever header version wrote it, up to `max_version`.
    With `foreign_ok`, a safetensors file without a cmboost header comes back with format None and
    an empty config (for weights saved by other tools); a cmboost file of another format never does."""
    path = Path(path)
    loaded, metadata = _open_safetensors(path, load_tensors=tensors)
    found, version, config, info = _parse_header(metadata, path)
    if found is None and not foreign_ok:
        raise UserInputError(f"{path}: not a cmboost {DESCRIPTIONS.get(format, format)} checkpoint "
                             f"(no {FORMAT_KEY} in its safetensors header)")
    if found is not None and found != format:
        raise UserInputError(f"{path}: holds a {DESCRIPTIONS.get(found, found)} ({found}), not a "
                             f"{DESCRIPTIONS.get(format, format)} ({format})")
    if version is not None and version > max_version:
        raise UserInputError(f"{path}: {format} checkpoint version {version} is newer than this cmboost reads "
                             f"(up to {max_version}); upgrade cmboost")
    check_finite(loaded, path)
    return Checkpoint(path, found, version, config, info, loaded)


def _parse_header(metadata: Mapping[str, str], path: Path) -> tuple[str | None, int | None, dict, dict]:
    """(format, version, config, info) from safetensors metadata, translating the version-1 headers."""
    if FORMAT_KEY in metadata:
        try:
            version = int(metadata.get(VERSION_KEY, ""))
        except ValueError:
            raise UserInputError(f"{path}: damaged cmboost header ({VERSION_KEY} {metadata.get(VERSION_KEY)!r} "
                                 "is not an integer)") from None
        config = _load_object(metadata.get(CONFIG_KEY, "{}"), CONFIG_KEY, path)
        return metadata[FORMAT_KEY], version, config, _load_object(metadata.get(INFO_KEY, "{}"), INFO_KEY, path)
    tag = metadata.get("format")
    if tag in _LEGACY_TAGS:
        config = _load_object(metadata.get("config", "{}"), "config", path)
        if tag == "cmboost.jcd/1":
            info = _load_object(metadata["extra"], "extra", path) if "extra" in metadata else {}
        else:  # domain nets kept their provenance as top-level strings
            info = {k: v for k, v in metadata.items() if k not in ("format", "config")}
        return _LEGACY_TAGS[tag], 1, config, info
    if "cmboost" in metadata:
        whole = _load_object(metadata["cmboost"], "cmboost", path)
        if whole.get("format") == "cmboost-cm":
            # Its provenance was merged into the same object, so all of it reads as the config.
            return "cm", 1, {k: v for k, v in whole.items() if k not in ("format", "version")}, {}
    return None, None, {}, {}


def _load_object(text: str, key: str, path: Path) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: damaged cmboost header ({key} is not valid JSON: {err})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{path}: damaged cmboost header ({key} is not a JSON object)")
    return value


# ----------------------------------------------------------------------------- digests

def weights_digest(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over the (name, raw bytes) of every tensor, sorted by name: a hash of
    the weights, not of the file, for any dtype and memory layout. For numpy dtypes the bytes are what
    tensor.numpy().tobytes() gives, so identities recorded before bf16 support are unchanged."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(_raw_bytes(tensor).numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- PyTorch pickles

def _numpy_safe_globals() -> list:
    """Numpy scalars and dtypes are plain data; old checkpoints carry them (e.g. a best accuracy).
    numpy 2 moved numpy.core to numpy._core, so the scalar is allowed under both names."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    safe: list = [np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
                  (scalar, "numpy._core.multiarray.scalar")]
    return safe + [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def torch_load(path: str | os.PathLike, fix: str = "") -> object:
    """torch.load(weights_only=True) onto the CPU: tensors and plain containers, never code.
    Every failure is one UserInputError line naming the file, ending with `fix` where given."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    if not path.exists():
        raise UserInputError(f"{path}: file not found{tail}")
    if not path.is_file():
        raise UserInputError(f"{path}: not a file{tail}")
    if path.stat().st_size == 0:
        raise UserInputError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint{tail}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise UserInputError(f"{path}: not a weights-only PyTorch checkpoint (damaged or another kind of "
                                 f"file){tail}") from None
        raise UserInputError(f"{path}: refused by torch.load(weights_only=True): it holds pickled Python objects "
                             f"(unsupported global {found.group(1)}); save its state_dict alone{tail}") from None
    except Exception as err:  # zip, EOF and OS errors from a damaged file come in many classes
        raise UserInputError(f"{path}: not a weights-only PyTorch checkpoint ({_first_line(err)}){tail}") from None


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuses weights holding NaN or inf at load, naming the file and the first bad tensor, so the
    failure is not reported later as bad images."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"{path}: tensor {name!r} holds NaN or inf; the checkpoint is damaged "
                                 f"(re-export or retrain it)")


def find_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded pickle: itself, or under 'model' / 'state_dict' /
    'model_state_dict' (training scripts nest it, up to a few levels deep)."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            check_finite(obj, path)
            return obj
        if isinstance(obj, dict):
            for key in ("model", "state_dict", "model_state_dict"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
    raise UserInputError(f"{path}: no state_dict of tensors found (top level holds {keys})")


def strip_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Maps the known foreign layouts onto the bare network's keys. Returns (state, facts): facts
    name the layout and may hold the robustness library's normaliser mean/std."""
    facts: dict = {}
    keys = list(state)
    if any(k.startswith(("module.model.", "module.normalizer.")) for k in keys):
        facts["layout"] = "robustness"
        mean, std = state.get("module.normalizer.new_mean"), state.get("module.normalizer.new_std")
        if mean is not None and std is not None:
            facts["mean"] = tuple(float(v) for v in mean.flatten())
            facts["std"] = tuple(float(v) for v in std.flatten())
        # module.attacker.model.* duplicates module.model.*; the normaliser is not a weight.
        return {k[len("module.model."):]: v for k, v in state.items() if k.startswith("module.model.")}, facts
    if "dummy" in state and any(k.startswith("model.") for k in keys):
        facts["layout"] = "released"  # the JCD paper's code: the network under model.*, plus a dummy
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, facts
    for prefix, layout in (("module.", "dataparallel"), ("backbone.", "jointmodel")):
        if keys and all(k.startswith(prefix) for k in keys):
            facts["layout"] = layout
            return {k[len(prefix):]: v for k, v in state.items()}, facts
    facts["layout"] = "plain"  # torchvision and OpenAI state_dicts already use the bare names
    return dict(state), facts


# ----------------------------------------------------------------------------- fitting a network

def describe_keys(items: list[str], n: int = 3) -> str:
    """The first `n` items, then how many more."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, object], path: str | os.PathLike,
               target: str) -> None:
    """Raises one UserInputError line unless `state` has exactly the keys and shapes of `expected`
    (a network's state_dict): "<path>: does not fit <target>: missing keys ...; unexpected keys ...;
    shape mismatch <key> <file shape> (file) vs <network shape>"."""
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    wrong = [f"{k} {tuple(getattr(state[k], 'shape', ()))} (file) vs {tuple(v.shape)}"
             for k, v in expected.items() if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    parts = ([f"missing keys {describe_keys(missing, 3)}"] if missing else []) + \
            ([f"unexpected keys {describe_keys(unexpected, 3)}"] if unexpected else []) + \
            ([f"shape mismatch {describe_keys(wrong, 2)}"] if wrong else [])
    if parts:
        raise UserInputError(f"{path}: does not fit {target}: {'; '.join(parts)}")
