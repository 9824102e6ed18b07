"""Images to features: batched, sharded under torchrun, gathered in image order, with running statistics."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch

from cmboost.errors import UserInputError
from cmboost.files.samples import ImageSource
from cmboost.metrics.features import FeatureExtractor
from cmboost.metrics.stats import RunningStats
from cmboost.runtime import dist_info, gather, in_cpu_chunks


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
            # on a CPU in cache-sized slices (runtime.CPU_CHUNK): faster, and the same features
            out = in_cpu_chunks(extractor, extractor.device, torch.from_numpy(batch))
            pool = out["pool"].cpu()
            pool_stats.update(pool)
            if spatial_stats is not None:
                spatial_stats.update(out["spatial"].cpu())
            mask = keep_mask[start : start + len(batch)]
            probs = None
            if keep_probs and out["logits"] is not None:  # None: a network without a classifier (DINOv2)
                probs = torch.softmax(out["logits"].double(), dim=1).float().cpu().numpy()
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
    probs = np.concatenate([p[1] for p in parts]) if keep_probs and parts and parts[0][1] is not None else None
    images = np.concatenate([p[2] for p in parts]) if keep_images else None
    return FeatureSet(n, mu, sigma, mu_s, sigma_s, pool, probs, images)
