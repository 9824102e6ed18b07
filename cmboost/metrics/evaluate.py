"""The evaluation pipeline: images -> features (batched, sharded under torchrun) -> metrics.

Result keys are fixed: fid, sfid, is, precision, recall, kid, kid_std (a metric that cannot be computed is None,
and notes[key] says why), plus num_samples, num_reference, feature_net, features.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from cmboost.atomic import atomic_open
from cmboost.errors import UserInputError
from cmboost.metrics.features import FeatureExtractor, load_feature_extractor
from cmboost.metrics.reference import Reference, load_reference
from cmboost.metrics.stats import (RunningStats, frechet_distance, inception_score, kernel_inception_distance,
                                   knn_radii, polynomial_kernel, precision_recall, psd_sqrt)
from cmboost.runtime import dist_info, gather
from cmboost.samples import ArraySource, ImageSource, open_samples

METRIC_KEYS = ("fid", "sfid", "is", "precision", "recall")
KID_KEYS = ("kid", "kid_std")  # unbiased KID and its std over subsets; they follow METRIC_KEYS in every result
IS_SPLIT_SIZE = 5000   # guided-diffusion evaluator
PR_NEIGHBOURS = 3      # k of the k-NN manifolds


# ----------------------------------------------------------------------------- feature extraction


@dataclasses.dataclass
class FeatureSet:
    count: int
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None      # float32 rows selected by `keep`
    probs: np.ndarray | None     # float32 softmax of every row
    images: np.ndarray | None    # uint8 NCHW rows selected by `keep`


def extract_features(source: ImageSource, extractor: FeatureExtractor, batch_size: int = 256,
                     keep: np.ndarray | None = None, keep_probs: bool = True, keep_images: bool = False,
                     progress: bool = False, desc: str = "features") -> FeatureSet:
    """Runs `extractor` over `source`. Statistics cover every image; pool features (and images) are
    kept for the sorted indices `keep` (None: all). Under torchrun, rank r takes batches r, r+W, ...
    and the parts are gathered in order, so the result does not depend on the number of ranks."""
    from tqdm import tqdm

    if batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: must be at least 1")
    info = dist_info()
    n = len(source)
    keep_mask = np.ones(n, dtype=bool) if keep is None else np.isin(np.arange(n), keep)
    pool_stats = RunningStats(extractor.pool_dim)
    spatial_stats = RunningStats(extractor.spatial_dim) if extractor.spatial_dim else None
    parts = []  # this rank's (pool, probs, images) per batch, in batch order
    bar = tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=not (progress and info.is_main),
               dynamic_ncols=True)
    with bar:
        for index, batch in enumerate(source.batches(batch_size)):
            start = index * batch_size
            if index % info.world_size != info.rank:
                bar.update(len(batch))
                continue
            out = extractor(torch.from_numpy(batch))
            pool = out["pool"].cpu()
            pool_stats.update(pool)
            if spatial_stats is not None:
                spatial_stats.update(out["spatial"].cpu())
            mask = keep_mask[start : start + len(batch)]
            probs = torch.softmax(out["logits"].double(), dim=1).float().cpu().numpy() if keep_probs else None
            parts.append((pool.numpy()[mask], probs, batch[mask] if keep_images else None))
            bar.update(len(batch))
    parts = gather(parts, info)
    stats = gather([(pool_stats, spatial_stats)], info) if info.enabled else [(pool_stats, spatial_stats)]
    pool_stats, spatial_stats = stats[0]
    for other_pool, other_spatial in stats[1:]:
        pool_stats.merge(other_pool)
        if spatial_stats is not None:
            spatial_stats.merge(other_spatial)
    if n < 2:
        raise UserInputError(f"{source.name}: {n} image(s); statistics need at least 2")
    mu, sigma = pool_stats.finalize()
    mu_s, sigma_s = spatial_stats.finalize() if spatial_stats is not None else (None, None)
    pool = np.concatenate([p[0] for p in parts]) if parts else None
    probs = np.concatenate([p[1] for p in parts]) if keep_probs else None
    images = np.concatenate([p[2] for p in parts]) if keep_images else None
    return FeatureSet(n, mu, sigma, mu_s, sigma_s, pool, probs, images)


# ----------------------------------------------------------------------------- metrics


def evaluate_source(source: ImageSource, reference: Reference | str | os.PathLike,
                    features: FeatureExtractor | str = "fmnist", batch_size: int = 256,
                    device: torch.device | str | None = None, precision: str | None = None,
                    inception_weights: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """FID, sFID, IS, precision and recall of the images in `source` against `reference`."""
    ref = reference if isinstance(reference, Reference) else load_reference(reference)
    extractor = load_feature_extractor(features, device, precision, inception_weights)
    extractor.check_images(source.shape, source.name)
    ref.check_against(extractor)
    if len(source) <= PR_NEIGHBOURS:
        raise UserInputError(f"{source.name}: {len(source)} images; need more than {PR_NEIGHBOURS} "
                             "(k-NN precision/recall)")
    samples = extract_features(source, extractor, batch_size, progress=progress, desc="samples")

    notes: dict[str, str] = {}
    ref_features = ref.features
    if ref_features is None and ref.images is not None:
        extractor.check_images(ref.images.shape[1:], f"{ref.source} (arr_0)")
        ref_set = extract_features(ArraySource(ref.images, f"{ref.source} arr_0"), extractor, batch_size,
                                   keep_probs=False, progress=progress, desc="reference")
        ref_features = ref_set.pool
        if ref.mu is None:
            ref.mu, ref.sigma, ref.mu_s, ref.sigma_s = ref_set.mu, ref_set.sigma, ref_set.mu_s, ref_set.sigma_s

    result: dict = {}
    if dist_info().is_main:
        if "sqrt_sigma" not in ref.cache:
            ref.cache["sqrt_sigma"] = psd_sqrt(ref.sigma)
        result["fid"] = frechet_distance(ref.mu, ref.sigma, samples.mu, samples.sigma,
                                         sqrt_sigma1=ref.cache["sqrt_sigma"])
        if samples.mu_s is None:
            result["sfid"], notes["sfid"] = None, extractor.spatial_reason
        elif ref.mu_s is None:
            result["sfid"], notes["sfid"] = None, f"{ref.source} holds no spatial statistics (mu_s, sigma_s)"
        else:
            result["sfid"] = frechet_distance(samples.mu_s, samples.sigma_s, ref.mu_s, ref.sigma_s)
        result["is"] = inception_score(samples.probs, IS_SPLIT_SIZE)
        if ref_features is None:
            result["precision"] = result["recall"] = None
            notes["precision"] = notes["recall"] = f"{ref.source} holds neither reference images nor features"
        elif len(ref_features) <= PR_NEIGHBOURS:
            result["precision"] = result["recall"] = None
            notes["precision"] = notes["recall"] = f"{ref.source}: {len(ref_features)} reference rows, too few for k=3"
        else:
            key = ("radii", PR_NEIGHBOURS, len(ref_features))
            if key not in ref.cache:
                real = torch.as_tensor(np.asarray(ref_features, dtype=np.float32), device=extractor.device)
                ref.cache[key] = knn_radii(real, PR_NEIGHBOURS)  # on the extractor's device, as before caching
            result["precision"], result["recall"] = precision_recall(
                ref_features, samples.pool, k=PR_NEIGHBOURS, device=extractor.device, real_radii=ref.cache[key])
        result["kid"], result["kid_std"], kid_note = _kid(ref, ref_features, samples.pool)
        if kid_note:
            notes["kid"] = notes["kid_std"] = kid_note
        result = {key: result[key] for key in METRIC_KEYS + KID_KEYS}
        result.update(notes={k: v for k, v in notes.items()}, num_samples=samples.count,
                      num_reference=None if ref_features is None else int(len(ref_features)),
                      reference_count=ref.count, feature_net=extractor.identity, features=extractor.name,
                      samples=source.name, reference=ref.source, feature_precision=extractor.precision)
    info = dist_info()
    if info.enabled:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _kid(ref: Reference, ref_features: np.ndarray | None, fake_features: np.ndarray) -> tuple:
    """(kid, kid_std, note): KID against the reference's kept features. The reference's own Gram
    matrix is the costly part, so it is kept on the Reference for the next evaluation against it."""
    if ref_features is None or len(ref_features) < 2 or len(fake_features) < 2:
        return None, None, f"{ref.source}: KID needs reference features and at least 2 rows on each side"
    key = ("kid_gram", len(ref_features))
    if key not in ref.cache:
        real = torch.as_tensor(np.asarray(ref_features, dtype=np.float32))
        ref.cache[key] = polynomial_kernel(real, real)
    kid, kid_std = kernel_inception_distance(ref_features, fake_features, real_gram=ref.cache[key])
    return kid, kid_std, None


def evaluate_images(images_u8: np.ndarray, reference: Reference | str | os.PathLike,
                    features: FeatureExtractor | str = "fmnist", batch_size: int = 256,
                    device: torch.device | str | None = None, precision: str | None = None,
                    inception_weights: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """Metrics of in-memory uint8 NCHW images against a reference (a Reference or an .npz path)."""
    return evaluate_source(ArraySource(np.asarray(images_u8), "images"), reference, features, batch_size,
                           device, precision, inception_weights, progress)


def evaluate_file(samples: str | os.PathLike, reference: Reference | str | os.PathLike,
                  features: FeatureExtractor | str = "fmnist", batch_size: int = 256,
                  device: torch.device | str | None = None, precision: str | None = None,
                  inception_weights: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """Metrics of a sample .npz (streamed) or PNG folder against a reference."""
    return evaluate_source(open_samples(samples), reference, features, batch_size, device, precision,
                           inception_weights, progress)


# ----------------------------------------------------------------------------- reporting


def format_table(result: dict) -> str:
    labels = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall"}
    lines = [f"{'metric':<10} value   ({result.get('num_samples')} samples, features {result.get('features')})"]
    for key in METRIC_KEYS:
        value = result.get(key)
        text = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else \
            f"n/a ({result.get('notes', {}).get(key, 'not computed')})"
        lines.append(f"{labels[key]:<10} {text}")
    if isinstance(result.get("kid"), float):
        lines.append(f"{'KID':<10} {result['kid']:.6f} +- {result['kid_std']:.6f} (std over subsets)")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, result: dict, overwrite: bool = False) -> Path:
    """Atomic JSON write (no NaN: missing metrics are null with a note)."""
    from cmboost.atomic import refuse_existing

    path = Path(path)
    refuse_existing(path, overwrite)
    with atomic_open(path, "w") as fh:
        json.dump(result, fh, indent=2, sort_keys=False, allow_nan=False)
        fh.write("\n")
    return path
