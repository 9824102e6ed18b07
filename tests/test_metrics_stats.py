"""Metric functions on synthetic features: FID, IS, precision/recall, running statistics.

torch-fidelity is imported unguarded on purpose: without it these tests fail (it is in the test extras).
"""

import numpy as np
import pytest
import torch
from scipy import linalg
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full, calculate_precision_recall_part

from cmboost.metrics.stats import RunningStats, feature_statistics, frechet_distance, inception_score

from cmboost.metrics.knn import knn_radii, precision_recall


def _gaussian(rng, n, d, shift=0.0, scale=1.0):
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mixing) * scale + shift


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- FID

def test_fid_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    a, b = _gaussian(rng, 400, 24), _gaussian(rng, 300, 24, shift=0.3, scale=1.4)
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-9)
    assert ours > 1.0  # the shift and scale are visible


def test_fid_of_identical_statistics_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    mu, sigma = feature_statistics(_gaussian(rng, 200, 16))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    mu2, sigma2 = feature_statistics(_gaussian(rng, 200, 16, shift=1.0))
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(frechet_distance(mu2, sigma2, mu, sigma), rel=1e-8)


def test_fid_agrees_with_torch_fidelity():
    rng = np.random.default_rng(2)
    a = torch.from_numpy(_gaussian(rng, 500, 32))
    b = torch.from_numpy(_gaussian(rng, 450, 32, shift=0.2, scale=0.8))
    stat_a, stat_b = fid_features_to_statistics(a), fid_features_to_statistics(b)
    theirs = fid_statistics_to_metric(stat_a, stat_b, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fid_singular_covariances_get_eps_and_stay_finite():
    rng = np.random.default_rng(3)
    # fewer samples than dimensions: both covariances are rank-deficient, the product singular
    a, b = rng.standard_normal((10, 40)), rng.standard_normal((10, 40)) + 0.5
    fid = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert np.isfinite(fid) and fid > 0


def test_fid_large_imaginary_component_raises():
    mu = np.zeros(2)
    bad = np.diag([1.0, -1.0])  # not a covariance: the product has a negative eigenvalue
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(mu, bad, mu, np.eye(2))


def test_fid_rejects_mismatched_or_nan_inputs():
    with pytest.raises(ValueError, match="differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_running_stats_match_numpy_and_ignore_batching_and_order():
    rng = np.random.default_rng(4)
    x = _gaussian(rng, 301, 12, shift=3.0)
    mu, sigma = np.mean(x, axis=0), np.cov(x, rowvar=False)
    one, many = RunningStats(12), RunningStats(12)
    one.update(x)
    for part in np.array_split(x[rng.permutation(len(x))], 7):
        many.update(part)
    for stats in (one, many):
        got_mu, got_sigma = stats.finalize()
        np.testing.assert_allclose(got_mu, mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_sigma, sigma, rtol=1e-10, atol=1e-12)
    left, right = RunningStats(12), RunningStats(12)
    left.update(x[:100])
    right.update(x[100:])
    left.merge(right)
    np.testing.assert_allclose(left.finalize()[1], sigma, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- Inception Score

def test_is_of_identical_predictions_is_one():
    probs = np.tile(np.array([[0.7, 0.2, 0.1]]), (50, 1))
    assert inception_score(probs) == pytest.approx(1.0, abs=1e-12)


def test_is_of_confident_balanced_predictions_is_number_of_classes():
    probs = np.eye(4)[np.arange(40) % 4]  # one-hot (exact zeros must not give NaN)
    assert inception_score(probs) == pytest.approx(4.0, rel=1e-12)


def test_is_uses_consecutive_splits_including_the_last_partial_one():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((23, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    split = [inception_score(probs[i : i + 10]) for i in (0, 10, 20)]
    assert inception_score(probs, split_size=10) == pytest.approx(np.mean(split), rel=1e-12)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.abs(logits) + 1.0)


def test_is_agrees_with_torch_fidelity_single_split():
    rng = np.random.default_rng(6)
    logits = torch.from_numpy(rng.standard_normal((200, 10)) * 3)
    theirs = isc_features_to_metric(logits, splits=1, shuffle=False)["inception_score_mean"]
    ours = inception_score(torch.softmax(logits, dim=1), split_size=5000)
    assert ours == pytest.approx(theirs, rel=1e-9)


# ----------------------------------------------------------------------------- precision / recall

def _clusters(rng, n_per, centres, spread=0.3):
    return np.concatenate([c + spread * rng.standard_normal((n_per, centres.shape[1])) for c in centres])


def test_collapsed_samples_have_high_precision_low_recall():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((5, 8)) * 6
    real = _clusters(rng, 80, centres)
    collapsed = _clusters(rng, 400, centres[:1], spread=0.15)  # all mass on one mode, less varied
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95
    assert recall < 0.2
    # the same samples spread over all modes recover recall
    _, recall_full = precision_recall(real, _clusters(rng, 80, centres))
    assert recall_full > 0.8


def test_precision_recall_identical_sets_are_one():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((100, 5))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_invariant_to_batch_size_and_order():
    rng = np.random.default_rng(9)
    real, fake = rng.standard_normal((150, 6)), rng.standard_normal((130, 6)) * 1.3 + 0.2
    base = precision_recall(real, fake, batch_size=5000)
    assert precision_recall(real, fake, batch_size=7) == base
    assert precision_recall(real[rng.permutation(150)], fake[rng.permutation(130)], batch_size=16) == base
    assert 0.0 < base[0] < 1.0 and 0.0 < base[1] < 1.0


def test_knn_radii_in_blocks_equal_full_matrix():
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.standard_normal((90, 4))).float()
    full = torch.cdist(x, x).kthvalue(4, dim=1).values
    torch.testing.assert_close(knn_radii(x, k=3, batch_size=13), full)


def test_precision_recall_agrees_with_torch_fidelity():
    rng = np.random.default_rng(11)
    real = torch.from_numpy(_clusters(rng, 60, rng.standard_normal((4, 10)) * 3)).float()
    fake = torch.from_numpy(_clusters(rng, 50, rng.standard_normal((4, 10)) * 3, spread=0.5)).float()
    # torch-fidelity's convention: features_1 = generated, features_2 = real
    theirs_full = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)
    theirs_part = calculate_precision_recall_part(fake, real, neighborhood=3, batch_size=64)
    ours = precision_recall(real, fake, k=3, batch_size=32)
    assert ours == pytest.approx(theirs_full, abs=1e-12)
    assert ours == pytest.approx(theirs_part, abs=1e-12)


# ----------------------------------------------------------------------------- KID


def test_kid_matches_torch_fidelity_draw_for_draw():
    from torch_fidelity.metric_kid import kid_features_to_metric

    from cmboost.metrics.kid import kernel_inception_distance

    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = (rng.normal(size=(200, 16)) * 1.3 + 0.2).astype(np.float32)
    kid, std = kernel_inception_distance(real, fake, subsets=20, subset_size=150, seed=5)
    theirs = kid_features_to_metric(torch.from_numpy(real), torch.from_numpy(fake), kid_subsets=20,
                                    kid_subset_size=150, rng_seed=5, verbose=False, kid_kernel="poly",
                                    kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    assert kid == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-5)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two():
    from cmboost.metrics.kid import kernel_inception_distance

    rng = np.random.default_rng(0)
    real, same = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    shifted = rng.normal(size=(600, 8)) + 0.5
    kid_same, std_same = kernel_inception_distance(real, same, subsets=30, subset_size=300)
    kid_diff, _ = kernel_inception_distance(real, shifted, subsets=30, subset_size=300)
    assert abs(kid_same) < 3 * std_same + 1e-3  # unbiased: centred on 0, may go negative
    assert kid_diff > 10 * max(abs(kid_same), std_same)


def test_kid_reuses_a_precomputed_reference_gram():
    from cmboost.metrics.kid import kernel_inception_distance, polynomial_kernel

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(120, 6)), rng.normal(size=(100, 6))
    gram = polynomial_kernel(torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(real, dtype=torch.float32))
    assert kernel_inception_distance(real, fake, subsets=5, real_gram=gram) == \
        kernel_inception_distance(real, fake, subsets=5)
    with pytest.raises(ValueError, match="subset size"):
        kernel_inception_distance(real, fake, subset_size=101)


def test_the_trace_from_the_rows_equals_the_full_one_when_there_are_fewer_rows_than_dimensions():
    from cmboost.metrics.stats import feature_statistics, frechet_distance, trace_sqrt_product, trace_sqrt_product_rows

    rng = np.random.default_rng(3)
    ref = rng.normal(size=(300, 60)) @ rng.normal(size=(60, 60))   # full-rank reference
    few = rng.normal(size=(25, 60)) * 2.0 + 0.5                   # 25 rows in 60 dimensions: rank 24
    mu1, sigma1 = feature_statistics(ref)
    mu2, sigma2 = feature_statistics(few)
    # The D x D route adds the square roots of the rounding noise of its 36 zero eigenvalues (about
    # 1e-6 each); the rows route has no zero eigenvalues to round, hence a 1e-7 tolerance, not 1e-9.
    assert trace_sqrt_product_rows(sigma1, few) == pytest.approx(trace_sqrt_product(sigma1, sigma2), rel=1e-7)
    assert frechet_distance(mu1, sigma1, mu2, sigma2, features2=few) == \
        pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-7)
    many = rng.normal(size=(200, 60))  # more rows than dimensions: the usual route, the same number
    mu3, sigma3 = feature_statistics(many)
    assert frechet_distance(mu1, sigma1, mu3, sigma3, features2=many) == frechet_distance(mu1, sigma1, mu3, sigma3)
    with pytest.raises(ValueError, match="features2"):
        trace_sqrt_product_rows(sigma1, few[:, :10])


# ----------------------------------------------------------------------------- a reference prepared once


def test_a_prepared_reference_gives_each_metric_of_the_plain_functions_to_float64_rounding():
    """ReferenceStatistics keeps the reference's side of every metric; each number it gives equals
    the plain function's on the same features, to float64 rounding (KID: its subset kernels are
    computed per subset instead of cut from one Gram matrix, so sums round in another order)."""
    from cmboost.metrics.prepared import ReferenceStatistics
    from cmboost.metrics.kid import kernel_inception_distance
    from cmboost.metrics.knn import density_coverage

    rng = np.random.default_rng(7)
    real = _gaussian(rng, 400, 24).astype(np.float32)
    prepared = ReferenceStatistics.of(real)
    mu, sigma = feature_statistics(real)
    assert np.array_equal(prepared.mu, mu) and np.array_equal(prepared.sigma, sigma)
    for shift in (0.0, 0.3):  # two generated sets against the same prepared reference
        fake = (_gaussian(rng, 180, 24, shift=shift) * 1.1).astype(np.float32)
        fmu, fsigma = feature_statistics(fake)
        assert prepared.fid(fmu, fsigma) == frechet_distance(mu, sigma, fmu, fsigma)  # the same route, bit for bit
        assert prepared.precision_recall(fake, 3) == precision_recall(real, fake, 3)
        assert prepared.density_coverage(fake, 3) == density_coverage(real, fake, 3)
        assert prepared.knn_metrics(fake, 3) == dict(zip(("precision", "recall", "density", "coverage"),
                                                         precision_recall(real, fake, 3) + density_coverage(real, fake, 3)))
        kid, std = prepared.kid(fake, subsets=15)
        plain_kid, plain_std = kernel_inception_distance(real, fake, subsets=15)
        assert kid == pytest.approx(plain_kid, rel=1e-9, abs=1e-13)
        assert std == pytest.approx(plain_std, rel=1e-9, abs=1e-13)
    few = (_gaussian(rng, 20, 24) + 0.2).astype(np.float32)  # fewer rows than dimensions: the rows route
    fmu, fsigma = feature_statistics(few)
    assert prepared.fid(fmu, fsigma, rows=few) == frechet_distance(mu, sigma, fmu, fsigma, features2=few)
    assert len(prepared._kid) == 1 and len(prepared._radii) == 1  # one draw (180 rows twice), one k


def test_statistics_run_on_one_thread_and_give_the_caller_its_threads_back():
    from cmboost.runtime import STATISTICS_THREADS, statistics_threads

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with statistics_threads():
            seen.append(torch.get_num_threads())
            with statistics_threads():  # nested: nothing changes, nothing is restored early
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    assert seen == [STATISTICS_THREADS, STATISTICS_THREADS, STATISTICS_THREADS, 2]


def test_the_paired_bootstrap_measures_the_change_and_its_noise_on_the_same_images():
    from cmboost.metrics.prepared import ReferenceStatistics

    rng = np.random.default_rng(11)
    real = _gaussian(rng, 1500, 16).astype(np.float32)
    prepared = ReferenceStatistics.of(real)
    before = (_gaussian(rng, 120, 16) * 1.4 + 0.5).astype(np.float32)
    after = (0.5 * before + 0.5 * _gaussian(rng, 120, 16)).astype(np.float32)  # pulled towards the reference
    paired = prepared.paired_bootstrap(before, after, resamples=50, seed=3)
    fid = lambda x: prepared.fid(*feature_statistics(x))  # noqa: E731
    assert paired["fid"]["change"] == pytest.approx(fid(after) - fid(before), rel=1e-9)
    assert paired["kid"]["change"] == pytest.approx(prepared.kid(after)[0] - prepared.kid(before)[0], rel=1e-9)
    for metric in ("fid", "kid"):
        assert paired[metric]["change"] < -2 * paired[metric]["std"] < 0  # a real gain, beyond the noise
    assert paired == prepared.paired_bootstrap(before, after, resamples=50, seed=3)  # seeded
    unchanged = prepared.paired_bootstrap(before, before, resamples=20)
    assert all(unchanged[m] == {"change": 0.0, "std": 0.0} for m in ("fid", "kid"))  # paired: no noise at all


@pytest.mark.parametrize("dims, rows", [(16, 120), (200, 120)])  # fewer / more dimensions than distinct rows
def test_each_bootstrap_resample_is_the_fid_and_kid_of_its_rows(dims, rows):
    """bootstrap() reads each resample's FID off precomputed products and KID off resampled kernels; each
    equals the plain FID and KID of the resampled rows (duplicates and all)."""
    from cmboost.metrics.prepared import ReferenceStatistics

    rng = np.random.default_rng(5)
    prepared = ReferenceStatistics.of(_gaussian(rng, 600, dims).astype(np.float32))
    fake = (_gaussian(rng, rows, dims) * 1.2 + 0.3).astype(np.float32)
    result = prepared.bootstrap(fake, resamples=6, seed=2)
    draws = np.random.default_rng(2)
    draws = [draws.integers(0, rows, rows) for _ in range(6)]
    # FID to 1e-7: with no more rows than dimensions, the zero eigenvalue that centring leaves rounds to
    # about 1e-15 in either computation, and its square root to about 3e-8
    assert result["fid"]["all"] == pytest.approx(prepared.fid(*feature_statistics(fake)), rel=1e-7)
    assert result["kid"]["all"] == pytest.approx(prepared.kid(fake)[0], rel=1e-9)
    for i, picked in enumerate(draws):
        resampled = fake[picked]
        assert result["fid"]["resampled"][i] == pytest.approx(prepared.fid(*feature_statistics(resampled)), rel=1e-7)
        assert result["kid"]["resampled"][i] == pytest.approx(prepared.kid(resampled)[0], rel=1e-9)
