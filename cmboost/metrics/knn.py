"""k-NN manifolds (Kynkaanniemi et al. 2019): precision and recall, and density and coverage (Naeem et al.
2020) on the same balls."""

from __future__ import annotations

import math

import torch

from cmboost.metrics.stats import as_float32_tensor
from cmboost.runtime import on_statistics_threads


@on_statistics_threads
def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 5000) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the (k+1)-th smallest distance,
    counting itself), in row x column blocks: memory is batch_size x (batch_size + k + 1)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature rows, have {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for start in range(0, n, batch_size):
        rows = features[start : start + batch_size]
        best = torch.full((rows.shape[0], k + 1), math.inf, dtype=features.dtype, device=features.device)
        for col in range(0, n, batch_size):
            # Others first, centres second, as `covered` and `density_coverage` call cdist: its matmul
            # path is not exactly symmetric, so both must read the same computed distance for a
            # ball's own edge point to test inside it.
            dist = torch.cdist(features[col : col + batch_size], rows).T
            best = torch.cat([best, dist], dim=1).topk(k + 1, dim=1, largest=False).values
        radii[start : start + rows.shape[0]] = best[:, k]
    return radii


def covered(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch_size: int = 5000) -> torch.Tensor:
    """For each query row: does it lie inside some ball (points[j], radii[j])? Bool [Nq]."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for start in range(0, queries.shape[0], batch_size):
        rows = queries[start : start + batch_size]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=queries.device)
        for col in range(0, points.shape[0], batch_size):
            dist = torch.cdist(rows, points[col : col + batch_size])
            hit |= (dist <= radii[col : col + batch_size].unsqueeze(0)).any(dim=1)
        inside[start : start + rows.shape[0]] = hit
    return inside


def _feature_pair(real_features, fake_features, device, batch_size: int, what: str):
    """Both feature sets as float32 tensors on one device, with matching widths."""
    real = as_float32_tensor(real_features, device)
    fake = as_float32_tensor(fake_features, real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what}: feature shapes {tuple(real.shape)} and {tuple(fake.shape)} do not match")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    return real, fake


@on_statistics_threads
def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 5000,
                     device: torch.device | str | None = None,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds:
    precision = share of generated rows inside some real row's k-NN ball, recall = share of real
    rows inside some generated row's k-NN ball. Distances in float32 blocks on `device`
    (default: where the features are), never an N x N matrix. `real_radii` (knn_radii of the real
    rows) may be passed in when the same reference is reused: for 10k rows it is the costly part."""
    real, fake = _feature_pair(real_features, fake_features, device, batch_size, "precision_recall")
    real_radii = knn_radii(real, k, batch_size) if real_radii is None else real_radii.to(real.device)
    fake_radii = knn_radii(fake, k, batch_size)
    precision = covered(fake, real, real_radii, batch_size).double().mean().item()
    recall = covered(real, fake, fake_radii, batch_size).double().mean().item()
    return float(precision), float(recall)


@on_statistics_threads
def density_coverage(real_features, fake_features, k: int = 3, batch_size: int = 5000,
                     device: torch.device | str | None = None,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) on the real rows' k-NN balls B(X_i, NND_k(X_i)),
    the same balls as precision uses (pass its `real_radii` to share them):
    density  = 1/(k M) sum_j sum_i 1[Y_j in B(X_i)]   (how many real balls hold each generated row),
    coverage = 1/N sum_i 1[some Y_j in B(X_i)]        (share of real balls holding a generated row),
    for N real rows X and M generated rows Y. One pass over generated x real blocks, float32
    distances on `device`, never an N x M matrix; counts are exact integers."""
    real, fake = _feature_pair(real_features, fake_features, device, batch_size, "density_coverage")
    if fake.shape[0] < 1:
        raise ValueError("density_coverage: no generated rows")
    radii = knn_radii(real, k, batch_size) if real_radii is None else real_radii.to(real.device)
    counts, hit = ball_counts(fake, real, radii, batch_size)
    density = int(counts.sum()) / (k * fake.shape[0])
    coverage = hit.double().mean().item()
    return float(density), float(coverage)


def ball_counts(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor,
                batch_size: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """(for each query row, how many balls (points[j], radii[j]) hold it; for each ball, whether any
    query row lies in it), from one pass over query x point blocks, computing each distance as
    `covered` does, so that `counts > 0` is `covered(queries, points, radii)` exactly."""
    counts = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    hit = torch.zeros(points.shape[0], dtype=torch.bool, device=queries.device)
    for start in range(0, queries.shape[0], batch_size):
        rows = queries[start : start + batch_size]
        for col in range(0, points.shape[0], batch_size):
            within = torch.cdist(rows, points[col : col + batch_size]) <= radii[col : col + batch_size].unsqueeze(0)
            counts[start : start + rows.shape[0]] += within.sum(dim=1)
            hit[col : col + within.shape[1]] |= within.any(dim=0)
    return counts, hit
