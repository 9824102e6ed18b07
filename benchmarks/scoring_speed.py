"""Scoring speed: cmboost's metrics against torch-fidelity's on the same features, idle and beside a
busy process, side by side in one run.

For 500 and 5,000 generated feature rows (256-d, a domain judge's width) against a 10,000-row
reference, it times:
  (a) cmboost with the reference prepared once (`ReferenceStatistics`: what tune's candidates, the
      demo's rows and the judge check's rungs do): FID, KID, precision/recall, density/coverage, and
      FID and KID alone (what (c) computes); the one-off preparation is printed apart;
  (b) cmboost with the statistics on torch's default threads instead of one (STATISTICS_THREADS,
      the choice runtime.py makes; this is the alternative);
  (c) torch-fidelity 0.4's FID (scipy sqrtm) and KID on the same features, as the baseline;
each idle and then beside one busy process (a one-thread matmul loop the script starts and stops),
with the busy/idle and cmboost/torch-fidelity ratios. `--demo` adds `cmboost demo` as a whole, in
a fresh output folder, idle and busy (a few minutes).

    python benchmarks/scoring_speed.py            # about 2 minutes on a 2-core CPU
    python benchmarks/scoring_speed.py --demo     # and the demo, idle and busy
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cmboost.runtime as runtime
from cmboost.metrics.stats import feature_statistics
from cmboost.metrics.prepared import ReferenceStatistics

BUSY_LOOP = """
import time, torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def busy_process(on: bool):
    """One process spinning a matmul loop on one core for the duration (nothing when `on` is False)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    time.sleep(1.0)  # let it start spinning
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def features(rng, rows: int, dim: int, mixing: np.ndarray, shift: float = 0.0) -> np.ndarray:
    return ((rng.standard_normal((rows, dim)) @ mixing) * (1.0 + shift) + shift).astype(np.float32)


def cmboost_scores(prepared: ReferenceStatistics, fake: np.ndarray) -> dict:
    mu, sigma = feature_statistics(fake)
    fid = prepared.fid(mu, sigma, rows=fake if len(fake) <= fake.shape[1] else None)
    return {"fid": fid, "kid": prepared.kid(fake)[0], **prepared.knn_metrics(fake, 3)}


def cmboost_fid_kid(prepared: ReferenceStatistics, fake: np.ndarray) -> dict:
    """The two metrics torch-fidelity computes, for a like-for-like ratio."""
    mu, sigma = feature_statistics(fake)
    return {"fid": prepared.fid(mu, sigma, rows=fake if len(fake) <= fake.shape[1] else None),
            "kid": prepared.kid(fake)[0]}


def fidelity_scores(real: torch.Tensor, fake: torch.Tensor) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    fid = fid_statistics_to_metric(fid_features_to_statistics(real), fid_features_to_statistics(fake),
                                   verbose=False)["frechet_inception_distance"]
    size = min(1000, len(real) // 2, len(fake) // 2)  # cmboost's default subset size, for the same work
    kid = kid_features_to_metric(real, fake, kid_subsets=100, kid_subset_size=size, rng_seed=0, verbose=False,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1)["kernel_inception_distance_mean"]
    return {"fid": fid, "kid": kid}


def prepare(real: np.ndarray, rows: int) -> tuple[ReferenceStatistics, float]:
    """A reference prepared for `rows` generated rows (factor, radii, KID subsets), and the seconds it took."""
    tic = time.perf_counter()
    prepared = ReferenceStatistics.of(real)
    prepared.fid_route()
    prepared.radii(3)
    dummy = np.zeros((rows, real.shape[1]), dtype=np.float32)
    prepared.kid(dummy)  # makes this row count's subsets; the value is thrown away
    return prepared, time.perf_counter() - tic


def time_demo(busy: bool) -> float:
    with tempfile.TemporaryDirectory() as folder, busy_process(busy):
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cmboost", "demo", "--out-dir", str(Path(folder) / "demo")],
                       check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256, help="feature width (a domain judge: 256; Inception: 2048)")
    parser.add_argument("--reference", type=int, default=10000, help="reference rows")
    parser.add_argument("--rows", default="500,5000", help="generated rows per set, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the best is printed)")
    parser.add_argument("--demo", action="store_true", help="also time `cmboost demo`, idle and busy")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)
    real = features(rng, args.reference, args.dim, mixing)
    sets = {int(n): features(rng, int(n), args.dim, mixing, shift=0.1) for n in args.rows.split(",")}
    default_threads = torch.get_num_threads()
    print(f"scoring {args.dim}-d features against a {args.reference}-row reference; torch {torch.__version__}, "
          f"{default_threads} CPU threads by default, statistics on {runtime.STATISTICS_THREADS}; best of "
          f"{args.repeats}", flush=True)

    results = {}
    for busy in (False, True):
        where = "busy" if busy else "idle"
        with busy_process(busy):
            for rows, fake in sets.items():
                prepared, prep_s = prepare(real, rows)
                ours = best_of(lambda: cmboost_scores(prepared, fake), args.repeats)
                ours_fid_kid = best_of(lambda: cmboost_fid_kid(prepared, fake), args.repeats)
                runtime.STATISTICS_THREADS = default_threads  # (b): the alternative, statistics on every thread
                try:
                    alt_prepared, alt_prep_s = prepare(real, rows)
                    alternative = best_of(lambda: cmboost_scores(alt_prepared, fake), args.repeats)
                finally:
                    runtime.STATISTICS_THREADS = 1
                real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
                fidelity = best_of(lambda: fidelity_scores(real_t, fake_t), 1 if rows > 1000 else args.repeats)
                results[where, rows] = dict(ours=ours, ours_fid_kid=ours_fid_kid, prep=prep_s, alternative=alternative, alt_prep=alt_prep_s,
                                            fidelity=fidelity)
                print(f"  {where} {rows:5d} rows: (a) cmboost {ours:6.3f} s per set, FID+KID alone {ours_fid_kid:6.3f} s "
                      f"(prepare once {prep_s:5.2f} s); "
                      f"(b) on {default_threads} threads {alternative:6.3f} s (prepare {alt_prep_s:5.2f} s); "
                      f"(c) torch-fidelity FID+KID {fidelity:6.3f} s", flush=True)
    print("ratios:")
    for rows in sets:
        idle, busy = results["idle", rows], results["busy", rows]
        print(f"  {rows:5d} rows: torch-fidelity / cmboost (FID+KID) {idle['fidelity'] / idle['ours_fid_kid']:5.1f}x idle, "
              f"{busy['fidelity'] / busy['ours_fid_kid']:5.1f}x busy; {default_threads} threads / 1 thread "
              f"{idle['alternative'] / idle['ours']:5.2f}x idle, {busy['alternative'] / busy['ours']:5.2f}x busy; "
              f"cmboost busy / idle {busy['ours'] / idle['ours']:4.2f}x (2x is a fair share of two cores)")
    if args.demo:
        idle_s = time_demo(False)
        print(f"  demo idle: {idle_s:6.1f} s", flush=True)
        busy_s = time_demo(True)
        print(f"  demo busy: {busy_s:6.1f} s; busy / idle {busy_s / idle_s:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
