"""The kernel inception distance (Binkowski et al. 2018): the unbiased MMD with a cubic polynomial kernel,
averaged over subsets."""

from __future__ import annotations

import numpy as np
import torch

from cmboost.metrics.stats import as_float32_tensor
from cmboost.runtime import on_statistics_threads

KID_SUBSETS = 100        # Binkowski et al. 2018 and torch-fidelity: 100 subsets of up to 1000 rows
KID_SUBSET_SIZE = 1000


@on_statistics_threads
def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, the cubic kernel of KID, as a float64 Gram matrix [len(a), len(b)]."""
    return (a.double() @ b.double().T / a.shape[1] + 1.0) ** 3


def kid_draws(real_count: int, fake_count: int, subsets: int = KID_SUBSETS, subset_size: int | None = None,
              seed: int = 0) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(subset size, [(real rows, generated rows)] per subset): each subset draws rows without
    replacement, real first and then generated, from one np.random.RandomState(seed), the draws of
    torch-fidelity's KID. They depend on the two counts only, so a reference can keep its side."""
    m, n = int(real_count), int(fake_count)
    # Default: 1000 rows, but at most half of each set, so that the subsets differ on both sides and
    # their spread measures sampling noise (a subset holding every row has no spread at all).
    size = min(KID_SUBSET_SIZE, m // 2, n // 2) if subset_size is None else int(subset_size)
    if size < 2 or size > min(m, n):
        raise ValueError(f"KID subset size {size}: need 2 <= size <= min({m} real, {n} generated rows)")
    rng = np.random.RandomState(seed)
    draws = []
    for _ in range(subsets):
        real_rows = torch.from_numpy(rng.choice(m, size, replace=False))
        draws.append((real_rows, torch.from_numpy(rng.choice(n, size, replace=False))))
    return size, draws


def _off_diagonal_sum(gram: torch.Tensor) -> torch.Tensor:
    return gram.sum() - gram.diagonal().sum()


def _indicators(draws: list, side: int, count: int, dtype=torch.float64) -> torch.Tensor:
    """[subsets, count] 0/1 rows: row i marks the rows that subset i draws on `side` (0 real, 1 generated)."""
    marks = torch.zeros(len(draws), count, dtype=dtype)
    for i, pair in enumerate(draws):
        marks[i, pair[side]] = 1.0
    return marks


def _kid_values(real_within: torch.Tensor, k_fake: torch.Tensor, k_cross: torch.Tensor,
                draws: list, size: int) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over the subsets, given each subset's off-diagonal sum of the
    real kernel (`real_within`, [subsets]), the generated rows' Gram matrix and the real x generated
    kernel. A subset's kernel sum is w_a^T K w_b for its 0/1 row markers w (rows are drawn without
    replacement): two matrix products for all subsets at once, instead of gathering a size x size
    block per subset, which on the CPU costs more than the kernels themselves."""
    real_marks = _indicators(draws, 0, k_cross.shape[0])
    fake_marks = _indicators(draws, 1, k_fake.shape[0])
    fake_all = ((fake_marks @ k_fake) * fake_marks).sum(dim=1)
    fake_diagonal = fake_marks @ k_fake.diagonal()
    cross = ((real_marks @ k_cross) * fake_marks).sum(dim=1)
    values = (real_within + fake_all - fake_diagonal) / (size * (size - 1)) - 2.0 * cross / (size * size)
    values = values.numpy()
    return float(values.mean()), float(values.std())


@on_statistics_threads
def kid_from_gram(k_real: torch.Tensor, k_fake: torch.Tensor, k_cross: torch.Tensor, subsets: int = KID_SUBSETS,
                  subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 (Binkowski et al. 2018, eq. 4) averaged over random subsets (`kid_draws`), and
    its standard deviation over the subsets, from precomputed Gram matrices: k_real [M, M], k_fake
    [N, N] and k_cross [M, N]. The same draws as torch-fidelity's KID, so the numbers match it."""
    size, draws = kid_draws(k_real.shape[0], k_fake.shape[0], subsets, subset_size, seed)
    real_marks = _indicators(draws, 0, k_real.shape[0])
    real_within = ((real_marks @ k_real) * real_marks).sum(dim=1) - real_marks @ k_real.diagonal()
    return _kid_values(real_within, k_fake, k_cross, draws, size)


@on_statistics_threads
def kernel_inception_distance(real_features, fake_features, subsets: int = KID_SUBSETS,
                              subset_size: int | None = None, seed: int = 0,
                              real_gram: torch.Tensor | None = None) -> tuple[float, float]:
    """(KID, its std over subsets): the unbiased polynomial-kernel MMD^2 between feature sets.
    `real_gram` (polynomial_kernel(real, real)) may be passed in; against a reference used again and
    again, ReferenceStatistics.kid keeps only what its subsets need. Gram matrices are float64
    throughout: KID is a small difference of large kernel means."""
    real = as_float32_tensor(real_features, "cpu")
    fake = as_float32_tensor(fake_features, "cpu")
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID: feature shapes {tuple(real.shape)} and {tuple(fake.shape)} do not match")
    k_real = polynomial_kernel(real, real) if real_gram is None else real_gram
    return kid_from_gram(k_real, polynomial_kernel(fake, fake), polynomial_kernel(real, fake),
                         subsets, subset_size, seed)
