"""Reading safetensors files: tensors and metadata in one pass, with one clear error naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cmboost.errors import UserInputError


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (on CPU) and metadata of a safetensors file; UserInputError naming the file if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found") from None
    except Exception as err:  # safetensors raises its own SafetensorError for damaged headers
        raise UserInputError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, dict(metadata)
