"""EDM2-style reference statistics in a pickle (.pkl): read without running code, written plainly.

EDM2's calculate_metrics.py saves a dataset reference (e.g. dataset-refs/img64.pkl) as a pickled
dict: {"num_images": int, "fid": {"mu", "sigma"}, "fd_dinov2": {"mu", "sigma"}}, the statistics of
its Inception-v3 and DINOv2 ViT-L/14 features over the whole training set, float64 numpy arrays.
A flat {"mu", "sigma", ...} dict is accepted too.

Pickles can run code on load, so they are read with an Unpickler whose find_class returns only
what numpy arrays, dtypes and numpy scalars are rebuilt from; any other global (os.system,
builtins.eval, a class of some package) is refused before it is called, with one line naming the
file. Dicts, lists, strings and numbers need no globals and load as usual.

cmboost writes the same layout (protocol 4, numpy arrays only), so EDM2's tools read its files:
the Inception entry is "fid", the DINOv2 entry "fd_dinov2", and any other network "fd_<name>".
The extra key "feature_nets" maps each entry to the identity of the network that made it, which
evaluation checks like that of an .npz reference; entries without it are taken to be EDM2's.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_open, refuse_existing

# (module, name) pairs a pickle of numpy arrays refers to, under numpy 1 and numpy 2 spellings.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol-5 arrays
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
INCEPTION_KEY, DINOV2_KEY = "fid", "fd_dinov2"


def _numpy_global(module: str, name: str):
    """The allowed object, from whichever numpy core this numpy has (no deprecated-module import)."""
    if module == "numpy":
        return getattr(np, name)
    submodule = module.split(".")[-1]
    for core in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{core}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise UserInputError(f"numpy has no {module}.{name}")


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, fh, source: str):
        super().__init__(fh)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise UserInputError(f"--ref {self.source}: refused to unpickle {module}.{name}; a reference pickle "
                                 "may hold only numpy arrays, numbers and strings (is this file what you think?)")
        return _numpy_global(module, name)


def read_pickle(path: str | os.PathLike):
    """The object in `path`, unpickled with only numpy-array globals allowed."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _ArraysOnly(fh, str(path)).load()
    except FileNotFoundError:
        raise UserInputError(f"--ref {path}: file not found") from None
    except UserInputError:
        raise
    except Exception as err:  # truncated or foreign files fail in many ways
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserInputError(f"--ref {path}: not a readable reference pickle ({type(err).__name__}: {first})") from None


def pickled_statistics(entry: dict, path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = entry.get("mu"), entry.get("sigma")
    where = f"--ref {path}" + (f" [{key}]" if key else "")
    if not isinstance(mu, np.ndarray) or not isinstance(sigma, np.ndarray):
        raise UserInputError(f"{where}: needs numpy arrays 'mu' and 'sigma' (has {', '.join(map(str, entry))})")
    for name, array in (("mu", mu), ("sigma", sigma)):
        if array.dtype.kind not in "biuf":
            raise UserInputError(f"{where}: {name} holds {array.dtype} values, not numbers")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserInputError(f"{where}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma


def fd_key(name: str) -> str:
    """The result key of a feature network's Frechet distance: fd_inception, fd_dinov2, fd_<file stem>."""
    stem = Path(str(name)).stem if ("/" in str(name) or "." in str(name)) else str(name)
    return "fd_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "features")


def pickle_key(name: str) -> str:
    """The entry name in an EDM2-style pickle: EDM2's own for Inception and DINOv2."""
    return INCEPTION_KEY if name == "inception" else fd_key(name)


def save_pickled_references(path: str | os.PathLike, stats: list[tuple[str, str, np.ndarray, np.ndarray]],
                            count: int, overwrite: bool = False) -> Path:
    """Atomic .pkl of [(extractor name, identity, mu, sigma)] in EDM2's layout (plain pickle of
    float64 numpy arrays), plus "feature_nets"."""

    path = Path(path)
    refuse_existing(path, overwrite)
    payload: dict = {"num_images": int(count)}
    nets = {}
    for name, identity, mu, sigma in stats:
        key = pickle_key(name)
        if key in payload:
            raise UserInputError(f"--features: {name} is listed twice")
        payload[key] = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
        nets[key] = str(identity)
    payload["feature_nets"] = nets
    with atomic_open(path, "wb") as fh:
        pickle.dump(payload, fh, protocol=4)
    return path
