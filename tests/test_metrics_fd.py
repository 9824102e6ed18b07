"""The Frechet distance's matrix square root: equal to scipy's sqrtm definition where that is well
defined, finite and real where sqrtm is not (rank-deficient covariances), the same in numpy and
in torch float64 on any device."""

import numpy as np
import pytest
import torch
from scipy import linalg

from cmboost.metrics.stats import feature_statistics, frechet_distance, psd_sqrt, trace_sqrt_product


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _stats(rng, n, d, shift=0.0, scale=1.0):
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return feature_statistics((rng.standard_normal((n, d)) @ mixing) * scale + shift)


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_agrees_with_scipy_sqrtm_to_1e_6_on_well_conditioned_statistics(dim):
    rng = np.random.default_rng(dim)
    (mu1, s1), (mu2, s2) = _stats(rng, 4 * dim, dim), _stats(rng, 3 * dim, dim, shift=0.2, scale=1.3)
    expected = _scipy_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # the same numbers as torch tensors (float32 input is promoted), and with a cached sqrt(sigma1)
    as_tensors = [torch.as_tensor(v) for v in (mu1, s1, mu2, s2)]
    assert frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2, sqrt_sigma1=psd_sqrt(s1)) == pytest.approx(expected, rel=1e-6)


def test_every_route_to_the_eigenvalues_gives_the_same_trace():
    rng = np.random.default_rng(0)
    (_, s1), (_, s2) = _stats(rng, 100, 20), _stats(rng, 100, 20, scale=2.0)
    low_rank = feature_statistics(rng.standard_normal((8, 20)))[1]  # rank 7: no Cholesky factor
    expected = np.trace(linalg.sqrtm(s1 @ s2).real)
    cholesky_s1 = trace_sqrt_product(s1, s2)
    cholesky_s2 = trace_sqrt_product(low_rank, s2)  # S1 singular: factors S2 instead
    root = trace_sqrt_product(s1, s2, sqrt_sigma1=psd_sqrt(s1))
    assert cholesky_s1 == pytest.approx(expected, rel=1e-9)
    assert root == pytest.approx(expected, rel=1e-9)
    assert cholesky_s2 == pytest.approx(np.trace(linalg.sqrtm(low_rank @ s2).real), rel=1e-8)


@pytest.mark.parametrize("samples", [3, 10, 30])
def test_rank_deficient_covariances_give_a_finite_real_distance(samples):
    rng = np.random.default_rng(samples)
    dim = 40  # more dimensions than samples: both covariances are singular, so is their product
    a, b = rng.standard_normal((samples, dim)), rng.standard_normal((samples, dim)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(ours) and ours > 0 and isinstance(ours, float)
    # the eigen-route reference: eig(S1^(1/2) S2 S1^(1/2)) in float64 via numpy, clipped at 0
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum()
    assert ours == pytest.approx(expected, rel=1e-7, abs=1e-7)
    # identical singular statistics are at distance 0, not NaN
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)
    assert np.isfinite(frechet_distance(*(torch.as_tensor(v) for v in (mu1, s1, mu2, s2))))


def test_zero_covariances_are_allowed():
    mu = np.zeros(5)
    assert frechet_distance(mu, np.zeros((5, 5)), mu + 1.0, np.zeros((5, 5))) == pytest.approx(5.0)


def test_indefinite_matrices_raise_instead_of_going_complex():
    bad = np.diag([1.0, -1.0])
    for args in ((bad, np.eye(2)), (np.eye(2), bad), (bad, np.diag([0.0, 1.0]))):
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(np.zeros(2), args[0], np.zeros(2), args[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_gpu_float64_equals_cpu():
    rng = np.random.default_rng(7)
    (mu1, s1), (mu2, s2) = _stats(rng, 600, 128), _stats(rng, 500, 128, shift=0.1)
    cpu = frechet_distance(mu1, s1, mu2, s2)
    gpu = frechet_distance(mu1, s1, mu2, s2, device="cuda")
    on_gpu_tensors = frechet_distance(*(torch.as_tensor(v, device="cuda") for v in (mu1, s1, mu2, s2)))
    assert gpu == pytest.approx(cpu, rel=1e-9) and on_gpu_tensors == pytest.approx(cpu, rel=1e-9)


def test_cpu_congruence_equals_the_two_products_and_leaves_inputs_alone():
    from cmboost.metrics.stats import _congruence

    rng = np.random.default_rng(8)
    (_, s1), (_, s2) = _stats(rng, 90, 30), _stats(rng, 90, 30, scale=0.5)
    before1, before2 = s1.copy(), s2.copy()
    factor = torch.linalg.cholesky(torch.from_numpy(s1))
    reduced, uplo = _congruence(factor, torch.from_numpy(s2))
    expected = (factor.T @ torch.from_numpy(s2) @ factor).numpy()
    triangle = np.triu if uplo == "U" else np.tril
    np.testing.assert_allclose(triangle(reduced.numpy()), triangle(expected), rtol=1e-10, atol=1e-12)
    frechet_distance(np.zeros(30), s1, np.ones(30), s2)
    np.testing.assert_array_equal(s1, before1)
    np.testing.assert_array_equal(s2, before2)
