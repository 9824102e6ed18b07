"""Density and coverage (Naeem et al. 2020) against a brute-force reading of their definitions,
known answers on toy data, and invariance to the block size."""

import numpy as np
import pytest
import torch

from cmboost.metrics.knn import density_coverage, knn_radii


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definitions word for word, with full float64 distance matrices."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    real_real = np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1))
    radii = np.sort(real_real, axis=1)[:, k]  # index 0 is the row itself
    fake_real = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1))
    inside = fake_real <= radii[None, :]  # [M, N]: Y_j in B(X_i, NND_k(X_i))
    density = inside.sum() / (k * len(fake))
    coverage = inside.any(axis=0).mean()
    return float(density), float(coverage)


def _modes(rng, per_mode: int, centres: np.ndarray, spread: float = 1.0) -> np.ndarray:
    return np.concatenate([c + spread * rng.standard_normal((per_mode, centres.shape[1])) for c in centres])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_density_coverage_equal_the_definitions(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((120, 6))
    fake = rng.standard_normal((90, 6)) * 1.2 + 0.3
    density, coverage = density_coverage(real, fake, k=k, batch_size=32)
    bf_density, bf_coverage = _brute_force(real, fake, k)
    # float32 distances against float64: allow one row to fall on the other side of a ball's edge
    assert density == pytest.approx(bf_density, abs=1.01 / (k * len(fake)))
    assert coverage == pytest.approx(bf_coverage, abs=1.01 / len(real))
    assert 0.0 < coverage < 1.0 and density > 0.0


def test_identical_sets_cover_everything_and_count_k_plus_one_per_ball():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    density, coverage = density_coverage(x, x, k=3)
    assert coverage == 1.0
    # each ball B(X_i, NND_k) holds X_i itself and its k nearest neighbours: k + 1 rows of Y = X
    assert density == pytest.approx(4 / 3, abs=2 / (3 * 200))


def test_two_samples_of_one_distribution_have_density_near_one():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4))
    density, coverage = density_coverage(real, fake, k=3, batch_size=500)
    assert density == pytest.approx(1.0, abs=0.08)  # E[density] = 1 (Naeem et al.)
    # E[coverage] = 1 - (N-1)...(N-k) / ((M+N-1)...(M+N-k)), about 1 - 2^-k for M = N
    assert coverage == pytest.approx(1 - 0.5 ** 3, abs=0.03)


def test_far_apart_sets_have_zero_density_and_coverage():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((100, 5))
    fake = rng.standard_normal((80, 5)) + 100.0
    assert density_coverage(real, fake, k=3) == (0.0, 0.0)


def test_a_dropped_mode_costs_its_share_of_coverage():
    rng = np.random.default_rng(3)
    centres = np.eye(4, 16) * 50.0  # four modes far apart
    real = _modes(rng, 150, centres)
    fake = _modes(rng, 1500, centres[:3])  # mode 4 never generated; modes 1-3 densely
    density, coverage = density_coverage(real, fake, k=3, batch_size=256)
    assert coverage == pytest.approx(3 / 4, abs=0.01)
    assert density == pytest.approx(_brute_force(real, fake, 3)[0], abs=0.01)


def test_density_coverage_do_not_depend_on_block_size_or_row_order():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((150, 6))
    fake = rng.standard_normal((130, 6)) * 1.3 + 0.2
    base = density_coverage(real, fake, batch_size=5000)
    for batch_size in (1, 7, 64):
        assert density_coverage(real, fake, batch_size=batch_size) == base
    shuffled = density_coverage(real[rng.permutation(150)], fake[rng.permutation(130)], batch_size=16)
    assert shuffled == pytest.approx(base, abs=1e-12)


def test_shared_radii_give_the_same_answer_and_bad_input_raises():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((60, 3)), rng.standard_normal((50, 3))
    radii = knn_radii(torch.as_tensor(real, dtype=torch.float32), k=3)
    assert density_coverage(real, fake, real_radii=radii) == density_coverage(real, fake)
    with pytest.raises(ValueError, match="do not match"):
        density_coverage(real, fake[:, :2])
    with pytest.raises(ValueError, match="batch_size"):
        density_coverage(real, fake, batch_size=0)
