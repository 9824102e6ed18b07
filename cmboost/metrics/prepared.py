"""A reference prepared once for every evaluation against it: its Cholesky factor, k-NN radii and KID
subsets kept, and FID, KID and the k-NN metrics of any number of sample sets, paired bootstrap included."""

from __future__ import annotations

import math

import numpy as np
import torch

from cmboost.metrics.kid import KID_SUBSETS, _indicators, _kid_values, _off_diagonal_sum, kid_draws, polynomial_kernel
from cmboost.metrics.knn import _feature_pair, ball_counts, covered, density_coverage, knn_radii, precision_recall
from cmboost.metrics.stats import as_float32_tensor, feature_statistics, frechet_distance, psd_eigenvalues, psd_sqrt
from cmboost.runtime import on_statistics_threads


class ReferenceStatistics:
    """What a reference contributes to FID, KID, precision/recall and density/coverage, each part
    computed on first use and kept: the Cholesky factor of its covariance (or the square root of a
    rank-deficient one), its k-NN radii, and per KID draw its subsets' kernel sums. Every evaluation
    against it (tune's candidates, the demo's rows, the judge check's rungs) then does only the
    generated side's work; the numbers are those of the plain functions above, to float64 rounding.
    `mu`, `sigma`: float64 statistics; `features`: float32 [M, D] rows for KID and the k-NN metrics."""

    def __init__(self, mu, sigma, features=None):
        self.mu = np.asarray(mu, dtype=np.float64)
        self.sigma = np.asarray(sigma, dtype=np.float64)
        self.features = None if features is None else np.ascontiguousarray(features, dtype=np.float32)
        self._fid_route: tuple[str, torch.Tensor] | None = None
        self._radii: dict[tuple, torch.Tensor] = {}
        self._kid: dict[tuple, tuple[int, list, list]] = {}

    @classmethod
    def of(cls, features) -> "ReferenceStatistics":
        """The statistics of feature rows [M, D], keeping the rows."""
        return cls(*feature_statistics(features), features=features)

    @on_statistics_threads
    def fid_route(self) -> tuple[str, torch.Tensor]:
        """("factor", L) with sigma = L L^T, or ("root", sigma^(1/2)) when sigma has no Cholesky
        factor (fewer reference images than dimensions); computed once."""
        if self._fid_route is None:
            sigma = torch.from_numpy(self.sigma)
            factor, info = torch.linalg.cholesky_ex(sigma)
            self._fid_route = ("factor", factor) if int(info) == 0 else ("root", psd_sqrt(sigma))
        return self._fid_route

    @on_statistics_threads
    def fid(self, mu, sigma, rows=None) -> float:
        """FID of generated statistics (mu, sigma) against this reference. `rows`, the generated
        feature rows, may be given: with no more rows than dimensions the trace comes from an N x N
        problem (trace_sqrt_product_rows), which needs nothing of the reference's but sigma."""
        if rows is not None and len(rows) <= len(self.mu):
            return frechet_distance(self.mu, self.sigma, mu, sigma, features2=rows)
        kind, matrix = self.fid_route()
        return frechet_distance(self.mu, self.sigma, mu, sigma,
                                **({"factor1": matrix} if kind == "factor" else {"sqrt_sigma1": matrix}))

    def _rows(self) -> np.ndarray:
        if self.features is None:
            raise ValueError("this reference keeps no feature rows (KID and the k-NN metrics need them)")
        return self.features

    @on_statistics_threads
    def radii(self, k: int, device: torch.device | str | None = None) -> torch.Tensor:
        """knn_radii of the reference rows, on `device` (default CPU), computed once per (k, device)."""
        device = torch.device(device or "cpu")
        key = (int(k), str(device))
        if key not in self._radii:
            self._radii[key] = knn_radii(torch.as_tensor(self._rows(), device=device), k)
        return self._radii[key]

    @on_statistics_threads
    def knn_metrics(self, fake_features, k: int = 3, device: torch.device | str | None = None) -> dict:
        """Precision, recall, density and coverage in one pass over the generated x real distances
        (precision and density read the same ones); the numbers of precision_recall and
        density_coverage exactly."""
        real, fake = _feature_pair(self._rows(), fake_features, device, 5000, "precision_recall")
        if fake.shape[0] <= k:
            raise ValueError(f"k-NN radii with k={k} need more than {k} feature rows, have {fake.shape[0]}")
        counts, hit = ball_counts(fake, real, self.radii(k, real.device))
        recall = covered(real, fake, knn_radii(fake, k))
        return {"precision": float((counts > 0).double().mean().item()), "recall": float(recall.double().mean().item()),
                "density": float(int(counts.sum()) / (k * fake.shape[0])), "coverage": float(hit.double().mean().item())}

    def precision_recall(self, fake_features, k: int = 3, device: torch.device | str | None = None):
        return precision_recall(self._rows(), fake_features, k, device=device, real_radii=self.radii(k, device))

    def density_coverage(self, fake_features, k: int = 3, device: torch.device | str | None = None):
        return density_coverage(self._rows(), fake_features, k, device=device, real_radii=self.radii(k, device))

    def _kid_side(self, fake: torch.Tensor, subsets: int, subset_size: int | None, seed: int):
        """The draws for this many generated rows, with the real side of each subset, made once."""
        real = torch.from_numpy(self._rows())
        if fake.ndim != 2 or fake.shape[1] != real.shape[1]:
            raise ValueError(f"KID: feature shapes {tuple(real.shape)} and {tuple(fake.shape)} do not match")
        key = (fake.shape[0], int(subsets), subset_size, int(seed))
        if key not in self._kid:
            size, draws = kid_draws(real.shape[0], fake.shape[0], subsets, subset_size, seed)
            within = torch.stack([_off_diagonal_sum(polynomial_kernel(real[r], real[r])) for r, _ in draws])
            self._kid[key] = (size, draws, within)
        return real, self._kid[key]

    @on_statistics_threads
    def kid(self, fake_features, subsets: int = KID_SUBSETS, subset_size: int | None = None,
            seed: int = 0) -> tuple[float, float]:
        """kernel_inception_distance against this reference. The draws depend on the generated row
        count, so per count (and subsets, size, seed) the real side of every subset, its rows and
        their kernel's off-diagonal sum, is computed once; no M x M Gram matrix is ever held."""
        fake = as_float32_tensor(fake_features, "cpu")
        real, (size, draws, within) = self._kid_side(fake, subsets, subset_size, seed)
        return _kid_values(within, polynomial_kernel(fake, fake), polynomial_kernel(real, fake), draws, size)

    @on_statistics_threads
    def bootstrap(self, features, resamples: int = 100, seed: int = 0) -> dict:
        """FID and KID of one generated set against this reference: on all its rows ("all") and on
        `resamples` resamplings of its rows with replacement ("resampled", an array), the rows drawn by
        np.random.default_rng(seed). Two sets of the same size draw the same rows, so the differences of
        their resampled values are a paired bootstrap (paired_bootstrap). {"fid": {"all", "resampled"},
        "kid": {...}}.

        FID per resample without a D x D covariance: with W W^T = sigma_ref (its Cholesky factor or
        root) and Y = X W computed once, the cross term tr((sigma_ref S)^(1/2)) of a resample is the sum
        of the square roots of the eigenvalues of (D^(1/2) Yc)(D^(1/2) Yc)^T / (N - 1) over its distinct
        rows, D their multiplicities and Yc = Y less the resample's mean: a U x U problem for U (about
        0.63 N) distinct rows, read off the set's N x N Gram matrix of Y (or, with fewer dimensions than
        distinct rows, the D x D matrix W^T S W). KID's kernels are computed once and resampled by index."""
        x = as_float32_tensor(features, "cpu")
        if x.ndim != 2 or x.shape[1] != self.mu.shape[0] or len(x) < 4:
            raise ValueError(f"bootstrap: {tuple(x.shape)} feature rows for {self.mu.shape[0]}-d statistics "
                             "(and at least 4 rows)")
        if resamples < 2:
            raise ValueError(f"bootstrap: {resamples} resamples; need at least 2")
        n = len(x)
        rng = np.random.default_rng(seed)
        draws = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(resamples)]
        # FID. Everything a resample needs is precomputed over the set's rows (centred on the set's
        # mean, which keeps the expanded Gram matrix well conditioned): a resample then costs a few
        # N-vectors and its U x U eigenvalue problem.
        x64 = x.double()
        _, root = self.fid_route()  # either way root @ root.T == sigma_ref
        centre = x64.mean(0)
        xc = x64 - centre
        y = xc @ root
        gram_y = None  # y @ y.T, made when a resample takes the U x U route
        sq_norms = (xc ** 2).sum(1)
        offset = centre - torch.from_numpy(self.mu)
        trace_ref = float(np.trace(self.sigma))
        fids = []
        for rows in draws:
            counts = torch.from_numpy(np.bincount(rows, minlength=n)).double()
            unique = torch.nonzero(counts).squeeze(1)
            weights = counts[unique]
            mean_x = counts @ xc / n  # the resample's mean less the set's
            trace_g = (float(counts @ sq_norms) - n * float(mean_x @ mean_x)) / (n - 1)
            mean_y = counts @ y / n
            if len(unique) <= y.shape[1]:  # the U x U problem
                gram_y = y @ y.T if gram_y is None else gram_y
                projection = y[unique] @ mean_y  # <y_i, mean_y> for the distinct rows
                inner = gram_y[unique][:, unique] - projection[:, None] - projection[None, :] + float(mean_y @ mean_y)
                root_w = weights.sqrt() / math.sqrt(n - 1)
                inner = root_w[:, None] * inner * root_w[None, :]
            else:  # fewer dimensions than distinct rows: the D x D one, W^T S W, with no rank-deficient noise
                inner = (y.T @ (counts[:, None] * y) - n * torch.outer(mean_y, mean_y)) / (n - 1)
            values, _ = psd_eigenvalues((inner + inner.T) / 2, "sigma1 sigma2", 1e-6)
            diff = offset + mean_x
            fids.append(float(diff @ diff) + trace_g + trace_ref - 2.0 * float(values.sqrt().sum()))
        # KID: the set's own kernel, and the real subsets' sums against each of its rows
        real, (size, kid_draws_, within) = self._kid_side(x, KID_SUBSETS, None, 0)
        fake_marks = _indicators(kid_draws_, 1, n)
        gram = polynomial_kernel(x, x)
        real_sums = _indicators(kid_draws_, 0, real.shape[0]) @ polynomial_kernel(real, x)
        kids = []
        for rows in draws:
            index = torch.from_numpy(rows)
            picked = gram[index][:, index]
            fake_all = ((fake_marks @ picked) * fake_marks).sum(dim=1) - fake_marks @ picked.diagonal()
            cross = (real_sums[:, index] * fake_marks).sum(dim=1)
            kids.append(float(((within + fake_all) / (size * (size - 1)) - 2.0 * cross / (size * size)).mean()))
        return {"fid": {"all": fids[0], "resampled": np.array(fids[1:])},
                "kid": {"all": kids[0], "resampled": np.array(kids[1:])}}

    def paired_bootstrap(self, before, after, resamples: int = 100, seed: int = 0) -> dict:
        """How FID and KID change from `before` to `after`, feature rows of the same images before and
        after an edit (row i is image i in both), with the standard deviation of each change over
        `resamples` resamplings of the images: the same resampled rows for both sets, so that the
        noise they share cancels (a paired bootstrap). {"fid": {"change", "std"}, "kid": {...}}."""
        if np.shape(before) != np.shape(after):
            raise ValueError(f"paired bootstrap: {tuple(np.shape(before))} and {tuple(np.shape(after))} rows must "
                             "be the same images")
        return paired_change(self.bootstrap(before, resamples, seed), self.bootstrap(after, resamples, seed))


def paired_change(before: dict, after: dict) -> dict:
    """The change from one set's `ReferenceStatistics.bootstrap` to another's (the same images, drawn
    alike): {"fid": {"change", "std"}, "kid": {...}}, std over the resamples (ddof 1)."""
    return {key: {"change": float(after[key]["all"] - before[key]["all"]),
                  "std": float(np.std(np.asarray(after[key]["resampled"]) - np.asarray(before[key]["resampled"]),
                                      ddof=1))}
            for key in ("fid", "kid")}
