"""Preconditioning (docs/method.md §5, Karras et al. 2022) and the samplers built on it.

A network F becomes a denoiser D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, 250 ln(s + 1e-44), y).
Consistency models use the boundary-condition scalings (sigma_min subtracted, so D(x, s_min) = x);
EDM teachers use Karras' scalings (nothing subtracted).

Samplers are plain functions of (denoiser, unit noise, labels, ...). The noise added between
steps comes from one generator per sample (runtime.sample_generators), so a sample does not
depend on the batch it was drawn in.

The Karras grid and the Heun step live here only; the CD/CT losses (cm/losses.py) reuse them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from cmboost.runtime import autocast, in_cpu_chunks, randn_per_sample

SIGMA_DATA, SIGMA_MIN, SIGMA_MAX, RHO = 0.5, 0.002, 80.0, 7.0
KINDS = ("cd", "ct", "edm")
# Default 2-step schedules of the OpenAI ImageNet-64 models: indices ts into an N-level Karras grid.
DEFAULT_TS = {"cd": ((0, 22, 39), 40), "ct": ((0, 106, 200), 201)}


@dataclasses.dataclass(frozen=True)
class Preconditioning:
    """c_skip, c_out, c_in and the time input. `boundary=True` is the consistency-model form."""

    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    boundary: bool = True

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sd2 = self.sigma_data ** 2
        shift = self.sigma_min if self.boundary else 0.0
        # CM:  c_skip = sd^2/((s-smin)^2+sd^2), c_out = (s-smin) sd / sqrt(s^2+sd^2)
        # EDM: c_skip = sd^2/(s^2+sd^2),        c_out = s sd / sqrt(s^2+sd^2)
        c_skip = sd2 / ((sigma - shift) ** 2 + sd2)
        c_out = (sigma - shift) * self.sigma_data / torch.sqrt(sigma ** 2 + sd2)
        c_in = 1.0 / torch.sqrt(sigma ** 2 + sd2)
        return c_skip, c_out, c_in

    @staticmethod
    def time_input(sigma: torch.Tensor) -> torch.Tensor:
        """The network's time argument: 1000 * 0.25 * ln(sigma + 1e-44)."""
        return 250.0 * torch.log(sigma + 1e-44)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CM_PRECOND = Preconditioning(boundary=True)
EDM_PRECOND = Preconditioning(boundary=False)


def precond_for_kind(kind: str, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                     sigma_max: float = SIGMA_MAX) -> Preconditioning:
    return Preconditioning(sigma_data, sigma_min, sigma_max, boundary=(kind != "edm"))


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma


def denoise(net: Callable, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None,
            precond: Preconditioning, clip: bool = False) -> torch.Tensor:
    """D(x, sigma) = c_skip x + c_out F(c_in x, t(sigma), y); fp32 in and out. `clip` clamps to [-1, 1]
    (done when sampling, never when training)."""
    sigma = _per_sample(sigma, x)
    c_skip, c_out, c_in = (c.view(-1, *([1] * (x.ndim - 1))) for c in precond.scalings(sigma))
    out = net(c_in * x, precond.time_input(sigma), labels).float()
    denoised = c_skip * x + c_out * out
    return denoised.clamp(-1.0, 1.0) if clip else denoised


class Denoiser:
    """A network plus its preconditioning, run under the chosen autocast; callable as D(x, sigma, y)."""

    def __init__(self, net: torch.nn.Module, precond: Preconditioning, device: torch.device,
                 precision: str = "fp32", clip: bool = True):
        self.net, self.precond, self.device, self.precision, self.clip = net, precond, device, precision, clip

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None) -> torch.Tensor:
        def chunk(x_, sigma_, labels_):
            return denoise(self.net, x_, sigma_, labels_, self.precond, clip=self.clip)

        with autocast(self.device, self.precision):  # on a CPU in cache-sized slices (runtime.CPU_CHUNK)
            return in_cpu_chunks(chunk, x.device, x, _per_sample(sigma, x), labels)


def karras_sigma(index: float | torch.Tensor, num_levels: int, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, rho: float = RHO, ascending: bool = False):
    """Level `index` of an N-level Karras grid. By default i = 0 is sigma_max and i = N-1 sigma_min
    (EDM's and OpenAI's sampler indexing); `ascending=True` gives the CM papers' t_1 = sigma_min < ... <
    t_N = sigma_max. Python numbers in, Python float out; a tensor index gives a tensor of its dtype."""
    # Both orders interpolate from their first level, not N-1-i from the other end: that keeps each
    # caller's floating-point rounding (samplers and losses were written with their own order).
    first, last = (sigma_min, sigma_max) if ascending else (sigma_max, sigma_min)
    # EDM eq. 5: sigma_i = (first^(1/rho) + i/(N-1) (last^(1/rho) - first^(1/rho)))^rho
    a, b = first ** (1 / rho), last ** (1 / rho)
    return (a + index / (num_levels - 1) * (b - a)) ** rho


def _broadcastable(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """A per-sample t of shape (B,) viewed against x's (B, ...); a Python float stays a float, so the
    sampler's arithmetic (scalar times tensor) is unchanged."""
    return t.view(-1, *([1] * (x.ndim - 1))) if torch.is_tensor(t) else t


def heun_step(denoiser: Callable, x: torch.Tensor, t_cur: torch.Tensor | float, t_next: torch.Tensor | float,
              labels: torch.Tensor | None, correct: bool = True) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dt = (x - D(x, t)) / t from t_cur to t_next: Euler, then
    (if `correct`) the trapezoid correction. t may be a float or per-sample (B,); `denoiser` is called as
    D(x, t, labels) with t as given. Used by the EDM sampler and by CD's teacher."""
    tc, tn = _broadcastable(t_cur, x), _broadcastable(t_next, x)
    # EDM Alg. 1, lines 4-5 (CM paper eq. 6 with Heun as the ODE solver)
    d = (x - denoiser(x, t_cur, labels)) / tc
    x_next = x + (tn - tc) * d
    if not correct:
        return x_next
    # EDM Alg. 1, lines 6-8: second-order correction
    d_next = (x_next - denoiser(x_next, t_next, labels)) / tn
    return x + (tn - tc) * 0.5 * (d + d_next)


def onestep(denoiser: Callable, noise: torch.Tensor, labels: torch.Tensor | None,
            sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """x = D(sigma_max z, sigma_max)."""
    return denoiser(sigma_max * noise, sigma_max, labels)


def multistep(denoiser: Callable, noise: torch.Tensor, labels: torch.Tensor | None, ts: Sequence[int],
              num_levels: int, generators: Sequence[torch.Generator], sigma_min: float = SIGMA_MIN,
              sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """OpenAI's stochastic iterative sampler: x_T = sigma_max z; for consecutive (ts[i], ts[i+1]):
    x0 = D(x, t_i), x = x0 + z_i sqrt(t_{i+1}^2 - smin^2), with t_{i+1} clipped to [smin, smax] and
    z_i drawn from each sample's generator. len(ts) - 1 network calls; the last ts is usually N-1
    (t = smin), which adds no noise, so the result is the last x0."""
    check_ts(ts, num_levels)
    x = sigma_max * noise
    for cur, nxt in zip(ts[:-1], ts[1:]):
        t = karras_sigma(cur, num_levels, sigma_min, sigma_max, rho)
        x0 = denoiser(x, t, labels)
        t_next = min(max(karras_sigma(nxt, num_levels, sigma_min, sigma_max, rho), sigma_min), sigma_max)
        scale = math.sqrt(max(t_next ** 2 - sigma_min ** 2, 0.0))
        if scale > 0:
            x = x0 + scale * randn_per_sample(generators, x0.shape[1:], device=x0.device)
        else:
            x = x0
    return x


def heun(denoiser: Callable, noise: torch.Tensor, labels: torch.Tensor | None, num_steps: int = 18,
         sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """Deterministic EDM sampler (Karras 2022, Alg. 1) for teachers: num_steps Karras levels then 0,
    Euler step plus Heun correction except into sigma = 0 (2 * num_steps - 1 network calls)."""
    if num_steps < 1:
        raise ValueError("heun needs at least one step")
    sigmas = [karras_sigma(i, num_steps, sigma_min, sigma_max, rho) if num_steps > 1 else sigma_max
              for i in range(num_steps)] + [0.0]
    x = sigma_max * noise
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        # no correction into sigma = 0, where d_next would divide by zero (EDM Alg. 1, line 6)
        x = heun_step(denoiser, x, t_cur, t_next, labels, correct=t_next > 0)
    return x


def check_ts(ts: Sequence[int], num_levels: int) -> None:
    """ts must be increasing indices into 0..N-1 with at least two entries."""
    if num_levels < 2:
        raise ValueError(f"N={num_levels}: needs at least 2 levels")
    if len(ts) < 2:
        raise ValueError(f"ts={list(ts)}: needs at least two indices")
    if any(b <= a for a, b in zip(ts[:-1], ts[1:])) or ts[0] < 0 or ts[-1] > num_levels - 1:
        raise ValueError(f"ts={list(ts)}: must increase within 0..{num_levels - 1}")
