"""Per-sample training losses for the EDM teacher, consistency distillation (CD) and consistency
training (CT) (docs/method.md §5), kept apart from the trainer as NVlabs EDM keeps its loss.py.
The trainer (cm/training.py) draws the noise levels and the noise; these functions only evaluate.

- EDM (Karras et al. 2022): D with Karras preconditioning (nothing subtracted), ln(sigma) ~
  N(P_mean=-1.2, P_std=1.2), loss weight (s^2 + sd^2) / (s sd)^2 on the squared error.
- CD (Song et al. 2023, Alg. 2): N Karras levels t_1 < ... < t_N; n uniform; x_{n+1} = x + t_{n+1} z;
  one Heun step of the teacher ODE dx/dt = (x - D_teacher(x, t)) / t from t_{n+1} to t_n gives
  x_hat_n; loss d(f(x_{n+1}, t_{n+1}), f_target(x_hat_n, t_n)) with f_target an EMA (mu) of f.
- CT, improved-CT style (Song & Dhariwal 2023): N(k) = min(s0 2^floor(k/K'), s1) + 1 levels,
  K' = floor(K / (log2(floor(s1/s0)) + 1)); level index i drawn from a discretised log-normal
  (P_mean -1.1, P_std 2.0); the same z at both levels; target = stop-grad of the online network
  (no EMA target); weight 1 / (t_{i+1} - t_i); pseudo-Huber distance c = 0.00054 sqrt(dim).
- ECT, easy consistency tuning (Geng et al. 2024), started from the EDM teacher's weights: t drawn
  log-normally (P_mean -1.1, P_std 2.0), r = t (1 - n(t) / q^a) with n(t) = 1 + 8 sigmoid(-t) and
  stage a = ceil(k / d), so the gap t - r shrinks by q every d iterations (a target below sigma_min
  is the clean image: the first stages are the teacher's own denoising task); the same z at both
  levels; target = stop-grad of the online network (no EMA target); weight 1 / (t - r).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from cmboost.cm.denoiser import (CM_PRECOND, EDM_PRECOND, RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, denoise, heun_step,
                                 karras_sigma)

DISTANCES = ("l2", "pseudo-huber")
# ECT's gap mapping n(t) = 1 + ECT_MAP_K sigmoid(-ECT_MAP_B t): the paper's constants
ECT_MAP_K, ECT_MAP_B = 8.0, 1.0


# ----------------------------------------------------------------------------- schedules and distances

def karras_levels(num_levels: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """All N levels t_1 = sigma_min < ... < t_N = sigma_max (the CM papers' indexing) as one float64 tensor."""
    index = torch.arange(num_levels, dtype=torch.float64)
    return karras_sigma(index, num_levels, sigma_min, sigma_max, rho, ascending=True)


def ct_num_scales(iteration: int, total_iters: int, start: int, end: int) -> int:
    """The number of levels N at iteration k of K (iCT's exponential curriculum, docs/method.md §5)."""
    # N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (floor(log2 floor(s1 / s0)) + 1))
    stages = math.floor(math.log2(max(end // start, 1))) + 1
    per_stage = max(total_iters // stages, 1)
    return min(start * 2 ** (iteration // per_stage), end) + 1


def ct_level_probs(num_levels: int, p_mean: float, p_std: float) -> torch.Tensor:
    """p(i) over the N-1 adjacent pairs (t_i, t_{i+1}): iCT's discretised log-normal (docs/method.md §5)."""
    # p(i) ∝ erf((ln t_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln t_i - P_mean)/(sqrt2 P_std))
    log_t = torch.log(karras_levels(num_levels))
    cdf = torch.erf((log_t - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return p / p.sum()


def ect_stage(iteration: int, stage_iters: int) -> int:
    """ECT's curriculum stage a = ceil(k / d) at iteration k (0 at the first iteration only)."""
    return -(-iteration // stage_iters)


def ect_gap_levels(t: torch.Tensor, stage: int, q: float) -> torch.Tensor:
    """The lower level r of ECT's pair (r, t): r = t (1 - n(t) / q^stage), at least 0."""
    ratio = (1.0 + ECT_MAP_K * torch.sigmoid(-ECT_MAP_B * t)) / q ** stage
    return (t * (1.0 - ratio)).clamp_min(0.0)


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance d(a, b): mean squared error ("l2") or iCT's pseudo-Huber ("pseudo-huber")."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    # pseudo-Huber (docs/method.md §5): sqrt(|a-b|^2 + c^2) - c with c = 0.00054 sqrt(dim)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return torch.sqrt(diff.pow(2).sum(1) + c * c) - c


# ----------------------------------------------------------------------------- losses (per sample)

def edm_loss(net: Callable, x: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """The EDM teacher's denoising loss at per-sample noise levels sigma."""
    denoised = denoise(net, x + sigma.view(-1, 1, 1, 1) * noise, sigma, labels, EDM_PRECOND)
    # EDM eq. 8 with Table 1's weight: lambda(s) |D(x + s n, s) - x|^2, lambda = (s^2 + sd^2) / (s sd)^2
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    return weight * (denoised - x).pow(2).flatten(1).mean(1)


def teacher_heun_step(teacher: Callable, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
                      labels: torch.Tensor | None) -> torch.Tensor:
    """CD's x_hat: one Heun step of the teacher's ODE from t_from to t_to (per sample); `teacher` is the
    raw EDM network, preconditioned here."""
    def teacher_denoiser(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return denoise(teacher, z, t, y, EDM_PRECOND)
    return heun_step(teacher_denoiser, x, t_from, t_to, labels)


def cd_loss(net: Callable, target: Callable, teacher: Callable, x: torch.Tensor, labels: torch.Tensor | None,
            n: torch.Tensor, noise: torch.Tensor, num_scales: int, dist: str) -> torch.Tensor:
    """Consistency distillation at ascending level pairs (t_n, t_{n+1}), n in 0..N-2."""
    levels = karras_levels(num_scales).to(x.device, torch.float32)
    t_cur, t_next = levels[n], levels[n + 1]
    # CM paper eq. 7: d(f(x_{n+1}, t_{n+1}), f_target(x_hat_n, t_n)), x_{n+1} = x + t_{n+1} z
    x_next = x + t_next.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        x_hat = teacher_heun_step(teacher, x_next, t_next, t_cur, labels)
        target_out = denoise(target, x_hat, t_cur, labels, CM_PRECOND)
    online = denoise(net, x_next, t_next, labels, CM_PRECOND)
    return distance(online, target_out.float(), dist)


def ct_loss(net: Callable, x: torch.Tensor, labels: torch.Tensor | None, i: torch.Tensor, noise: torch.Tensor,
            num_scales: int, dist: str) -> torch.Tensor:
    """Improved consistency training at ascending level pairs (t_i, t_{i+1}); the target is the online
    network without gradient (no EMA target)."""
    levels = karras_levels(num_scales).to(x.device, torch.float32)
    t_cur, t_next = levels[i], levels[i + 1]
    # CM paper eq. 10 with iCT's weight: d(f(x + t_{i+1} z, t_{i+1}), sg f(x + t_i z, t_i)) / (t_{i+1} - t_i)
    with torch.no_grad():
        target_out = denoise(net, x + t_cur.view(-1, 1, 1, 1) * noise, t_cur, labels, CM_PRECOND)
    online = denoise(net, x + t_next.view(-1, 1, 1, 1) * noise, t_next, labels, CM_PRECOND)
    return distance(online, target_out.float(), dist) / (t_next - t_cur)


def ect_loss(net: Callable, x: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor,
             stage: int, q: float, dist: str) -> torch.Tensor:
    """Easy consistency tuning at per-sample levels t (their partners r from the stage's gap); the
    target is the online network without gradient, or the clean image where r is below sigma_min."""
    r = ect_gap_levels(t, stage, q)
    # d(f(x + t z, t), sg f(x + r z, r)) / (t - r); f(x, sigma_min) = x is the boundary condition
    clean = r < SIGMA_MIN
    with torch.no_grad():
        if bool(clean.all()):  # the early stages: no target network call at all
            target_out = x
        else:
            target_out = denoise(net, x + r.view(-1, 1, 1, 1) * noise, r.clamp_min(SIGMA_MIN), labels, CM_PRECOND)
            target_out = torch.where(clean.view(-1, 1, 1, 1), x, target_out.float())
    online = denoise(net, x + t.view(-1, 1, 1, 1) * noise, t, labels, CM_PRECOND)
    return distance(online, target_out, dist) / (t - r)
