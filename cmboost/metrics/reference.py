"""Reference batches: what samples are compared against.

OpenAI's reference .npz (e.g. VIRTUAL_imagenet64_labeled.npz) holds `arr_0` (10k reference
images, uint8 NHWC) and the Inception statistics of the whole training set: `mu`, `sigma` (pool
features) and `mu_s`, `sigma_s` (spatial features). Precision/recall use the features of `arr_0`,
computed at evaluation time.

The .npz files cmboost writes (`cmboost evaluate-ref`) keep that layout and add:
`features` (float32 [M, D], the pool features of `arr_0`, so evaluation need not recompute
them), `feature_net` (which network made the statistics; checked at evaluation), `count`
(images behind mu/sigma) and `data` (which data). They stay readable by OpenAI's evaluator
when made with Inception. EDM2-style .pkl references (mu/sigma of one or more feature networks,
nothing else) are read and written by ref_pickle.py.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_open, refuse_existing
from cmboost.files.samples import ArraySource, ImageSource
from cmboost.metrics.dinov2 import DINOV2_IDENTITY
from cmboost.metrics.extract import extract_features
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.ref_pickle import DINOV2_KEY, INCEPTION_KEY, pickled_statistics, read_pickle
from cmboost.metrics.stats import check_covariance

OPENAI_FEATURE_NET = "inception-v3-tf-2015-12-05"  # what OpenAI's reference files were made with


@dataclasses.dataclass
class Reference:
    mu: np.ndarray | None                 # float64 [D]
    sigma: np.ndarray | None              # float64 [D, D]
    mu_s: np.ndarray | None = None        # spatial (sFID) statistics, when the network has them
    sigma_s: np.ndarray | None = None
    features: np.ndarray | None = None    # float32 [M, D] pool features of `images`, for precision/recall
    images: np.ndarray | None = None      # uint8 NCHW reference images (arr_0)
    feature_net: str | None = None        # identity of the feature network; None = OpenAI's (Inception)
    count: int | None = None              # images behind mu/sigma
    source: str = ""                      # where it was read from (named in messages)
    data: str = ""                        # which data the statistics describe (e.g. "fmnist test")
    # What evaluations against this reference reuse (KID Gram matrix, k-NN radii, sqrt(sigma)); never saved.
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def net(self) -> str:
        return self.feature_net or OPENAI_FEATURE_NET

    def check_against(self, extractor) -> None:
        """Raises UserInputError unless these statistics were made by `extractor`'s network."""
        if self.net != extractor.identity:
            raise UserInputError(
                f"{self.source}: reference made with feature net {self.net}, but --features {extractor.name} "
                f"is {extractor.identity}; use the matching --features or compute a reference with "
                "'cmboost evaluate-ref'")
        if self.mu is not None and self.mu.shape != (extractor.pool_dim,):
            raise UserInputError(f"{self.source}: mu has shape {self.mu.shape}, the {extractor.name} features "
                                 f"have {extractor.pool_dim} dimensions")
        if self.features is not None and self.features.shape[1] != extractor.pool_dim:
            raise UserInputError(f"{self.source}: features have {self.features.shape[1]} dimensions, the "
                                 f"{extractor.name} features have {extractor.pool_dim}")


def check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    """Finite statistics of matching shapes whose sigma is a covariance (positive semi-definite up to
    rounding), or one line naming the reference."""

    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserInputError(f"{where}: mu {mu.shape} and sigma {sigma.shape} do not match")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserInputError(f"{where}: the statistics hold NaN or inf; rebuild the reference")
    try:
        check_covariance(sigma)
    except ValueError as err:
        raise UserInputError(f"{where}: {str(err).removeprefix('Frechet distance: ')}; rebuild the "
                             f"reference") from None


def numeric_array(value, where: str, key: str) -> np.ndarray:
    """`value` as float64, or one line naming the reference and the key when it holds anything but
    numbers (strings, objects)."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise UserInputError(f"{where}: {key} holds {array.dtype} values, not numbers")
    return array.astype(np.float64)


def load_references(spec) -> list[Reference]:
    """Every reference named by `spec`: a path, a comma-separated string of paths, or a list of
    either. An EDM2-style .pkl (metrics/ref_pickle.py) gives one Reference per feature network."""
    if isinstance(spec, Reference):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [ref for item in spec for ref in load_references(item)]
    parts = [part for part in str(spec).split(",") if part] if isinstance(spec, str) else [spec]
    if len(parts) > 1:
        return load_references(parts)
    if Path(parts[0]).suffix.lower() == ".pkl":
        return load_pickled_references(parts[0])
    return [load_reference(parts[0])]


def load_reference(path: str | os.PathLike) -> Reference:
    """Reads an OpenAI reference .npz, one written by save_reference, or a one-network .pkl."""
    path = Path(path)
    if path.suffix.lower() == ".pkl":
        refs = load_references(path)
        if len(refs) != 1:
            raise UserInputError(f"--ref {path}: holds statistics of {len(refs)} feature networks "
                                 f"({', '.join(r.net for r in refs)}); use it with 'cmboost evaluate'")
        return refs[0]
    if path.is_file() and not zipfile.is_zipfile(path):
        # np.load would read it as a pickle and suggest allow_pickle=True, which must never be done here
        raise UserInputError(f"--ref {path}: not an .npz (zip) archive, nor an EDM2 .pkl")
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserInputError(f"--ref {path}: file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserInputError(f"--ref {path}: not a readable .npz file ({err})") from None
    with archive:
        names = set(archive.files)
        try:
            arrays = {name: archive[name] for name in names}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise UserInputError(f"--ref {path}: damaged array ({err})") from None
    if "mu" not in names and "arr_0" not in names:
        raise UserInputError(f"--ref {path}: neither 'mu'/'sigma' statistics nor 'arr_0' images "
                             f"(has {', '.join(sorted(names)) or 'nothing'})")
    ref = Reference(mu=None, sigma=None, source=str(path))
    for key in ("mu", "mu_s"):
        sig_key = key.replace("mu", "sigma")
        if key in names or sig_key in names:
            mu, sigma = arrays.get(key), arrays.get(sig_key)
            if mu is None or sigma is None:
                raise UserInputError(f"--ref {path}: has '{key if mu is not None else sig_key}' without "
                                     f"'{sig_key if mu is not None else key}'")
            mu, sigma = numeric_array(mu, f"--ref {path}", key), numeric_array(sigma, f"--ref {path}", sig_key)
            check_statistics(mu, sigma, f"--ref {path} ({key}, {sig_key})")
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise UserInputError(f"--ref {path}: {key} {mu.shape} and {sig_key} {sigma.shape} do not match")
            setattr(ref, key, mu)
            setattr(ref, sig_key, sigma)
    if "arr_0" in names:
        images = arrays["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise UserInputError(f"--ref {path}: arr_0 must be uint8 NHWC images, got {images.dtype} {images.shape}")
        ref.images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if "features" in names:
        features = numeric_array(arrays["features"], f"--ref {path}", "features").astype(np.float32)
        if features.ndim != 2:
            raise UserInputError(f"--ref {path}: features must be [N, D], got {features.shape}")
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if len(bad):  # one NaN row makes KID and the k-NN metrics NaN
            raise UserInputError(f"--ref {path}: features hold NaN or inf ({len(bad)} of {len(features)} rows, "
                                 f"the first row {bad[0]}); rebuild the reference")
        if ref.mu is not None and features.shape[1] != ref.mu.shape[0]:
            raise UserInputError(f"--ref {path}: features have {features.shape[1]} dimensions, mu {ref.mu.shape[0]}")
        ref.features = features
    if "feature_net" in names:
        ref.feature_net = str(arrays["feature_net"])
    if "count" in names:
        count = arrays["count"]
        if count.shape != () or count.dtype.kind not in "iu" or int(count) < 0:
            raise UserInputError(f"--ref {path}: count must be one whole number >= 0 (the images behind mu and "
                                 f"sigma), got {count.dtype} {count.shape if count.shape else count.item()!r}")
        ref.count = int(count)
    if "data" in names:
        ref.data = str(arrays["data"])
    return ref


def save_reference(path: str | os.PathLike, ref: Reference, overwrite: bool = False, compact: bool = False) -> Path:
    """Atomic .npz write in the layout described above (images stored NHWC, like OpenAI's). `compact`
    stores the covariances in float32 and the features in float16, half the size or less (for files
    that ship in the package); they are read back as float64 and float32 all the same."""

    path = Path(path)
    refuse_existing(path, overwrite)
    arrays: dict[str, np.ndarray] = {}
    if ref.images is not None:
        arrays["arr_0"] = np.ascontiguousarray(ref.images.transpose(0, 2, 3, 1))
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        if getattr(ref, key) is not None:
            arrays[key] = np.asarray(getattr(ref, key), np.float32 if compact and key.startswith("sigma")
                                     else np.float64)
    if ref.features is not None:
        arrays["features"] = np.asarray(ref.features, np.float16 if compact else np.float32)
    arrays["feature_net"] = np.array(ref.net)
    if ref.count is not None:
        arrays["count"] = np.array(int(ref.count), dtype=np.int64)
    arrays["data"] = np.array(ref.data or ref.source)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def choose_subset(count: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of the `size` images (of `count`) whose features are kept for precision/recall:
    all of them when there are no more than `size`, else a seeded random choice."""
    if count <= size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def reference_stats(images_u8, extractor, batch_size: int = 256, num_features: int = 10000, seed: int = 0,
                    source: str = "", progress: bool = False) -> Reference:
    """Statistics of uint8 NCHW `images_u8` (an array or an evaluate.ImageSource) under `extractor`
    (a FeatureExtractor or a spec like "fmnist"/"inception"): mu/sigma (and mu_s/sigma_s) over all
    images, plus the images and pool features of up to `num_features` of them for precision/recall."""

    extractor = load_feature_extractor(extractor)
    data = images_u8 if isinstance(images_u8, ImageSource) else ArraySource(images_u8, source or "reference images")
    extractor.check_images(data.shape, data.name)
    keep = choose_subset(len(data), num_features, seed)
    feats = extract_features(data, extractor, batch_size, keep=keep, keep_probs=False, keep_images=True,
                             progress=progress, desc="reference")
    return Reference(mu=feats.mu, sigma=feats.sigma, mu_s=feats.mu_s, sigma_s=feats.sigma_s,
                     features=feats.pool, images=feats.images, feature_net=extractor.identity,
                     count=feats.count, source=source or data.name, data=source or data.name)


# ----------------------------------------------------------------------------- EDM2-style .pkl

def _default_identity(key: str) -> str | None:
    # EDM2's Inception is a PyTorch translation of the same TF 2015-12-05 graph as OpenAI's
    return {INCEPTION_KEY: OPENAI_FEATURE_NET, DINOV2_KEY: DINOV2_IDENTITY}.get(key)


def load_pickled_references(path: str | os.PathLike) -> list:
    """One Reference per statistics entry of an EDM2-style .pkl (mu/sigma only: no images, so no
    precision/recall/KID against it)."""

    path = Path(path)
    data = read_pickle(path)
    if not isinstance(data, dict):
        raise UserInputError(f"--ref {path}: holds a {type(data).__name__}, not a dict of statistics")
    nets = data.get("feature_nets", {})
    if not isinstance(nets, dict) or not all(isinstance(v, str) for v in nets.values()):
        raise UserInputError(f"--ref {path}: 'feature_nets' must map entry names to network identities")
    count = data.get("num_images")
    if count is not None and (not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0):
        raise UserInputError(f"--ref {path}: num_images must be a whole number >= 0 (the images behind the "
                             f"statistics), got {count!r}")
    count = None if count is None else int(count)
    entries = [(key, value) for key, value in data.items()
               if isinstance(value, dict) and ("mu" in value or "sigma" in value)]
    if "mu" in data or "sigma" in data:
        entries.insert(0, ("", data))
    if not entries:
        raise UserInputError(f"--ref {path}: no 'mu'/'sigma' statistics (has {', '.join(map(str, data)) or 'nothing'})")
    refs = []
    for key, entry in entries:
        mu, sigma = pickled_statistics(entry, path, key)
        check_statistics(mu, sigma, f"--ref {path}" + (f" [{key}]" if key else ""))
        if key:
            identity = nets.get(key) or _default_identity(key)
        else:  # a flat dict says which network made it, or its width does (2048: Inception, 1024: DINOv2)
            named = entry.get("feature_net")
            identity = named if isinstance(named, str) else {2048: OPENAI_FEATURE_NET,
                                                              1024: DINOV2_IDENTITY}.get(mu.shape[0])
        if identity is None:
            raise UserInputError(f"--ref {path}: cannot tell which feature network made "
                                 f"{repr(key) if key else 'its mu/sigma'} (no 'feature_nets' entry)")
        refs.append(Reference(mu=mu, sigma=sigma, feature_net=identity, count=count,
                              source=f"{path}" + (f" [{key}]" if key else ""), data=str(path)))
    return refs


