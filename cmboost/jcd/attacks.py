"""Projected gradient ascent on the input (PGD), L2 and Linf, for any per-example objective.

PGD knows nothing about the model: the caller passes `objective(x) -> [B]` values to maximise
(closures carry the labels; negate to minimise) and an optional `stop(x) -> bool [B]`. A caller that
passes `labels` gets `objective(x, labels)` and `stop(x, labels)` instead, for any subset of rows: with
a stop rule, PGD then runs both on the rows still moving only, so stopped rows cost nothing. An
objective that can tell from its own forward pass which rows are done returns (values, done) under
`stop=FROM_OBJECTIVE`, which saves the rule's separate forward pass at every step.
Gradients come from `torch.autograd.grad` with respect to the input only, with the parameters'
requires_grad switched off for the duration, so no parameter gradient is computed or touched.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cmboost.errors import UserInputError
from cmboost.runtime import PRECISIONS, autocast, randn_per_sample

NORMS = ("l2", "linf")
Objective = Callable[..., torch.Tensor]              # (x) or, with labels, (x, labels) -> [B]
StopRule = Callable[..., "torch.Tensor | None"]      # the same arguments -> bool [B], or None
# stop=FROM_OBJECTIVE: the objective returns (values, done) from its one forward pass, so that a step
# costs one forward and one backward instead of two forwards and a backward.
FROM_OBJECTIVE = "from objective"


def _deactivate(active: torch.Tensor, rows: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
    """`active` (a [B] mask) with rows[stopped] switched off; `rows` are all active."""
    active = active.clone()
    active[rows] = ~stopped
    return active


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, ...] L2 norm of each example, shaped to broadcast against t."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


class PGD:
    """x_{t+1} = Proj_{||x - x0|| <= eps}( clip_bounds( x_t + step_size * d_t ) ) with
    d_t = g / ||g||_2 per example ("l2") or sign(g) ("linf"), g = grad_x objective(x_t).

    `random_start` starts from a uniform point of the eps ball (L2: direction uniform on the
    sphere, radius eps * U(0, 1); Linf: U(-eps, eps) per pixel), drawn from the per-sample
    `generators` when given so the result does not depend on the batch.
    `precision` ("fp32", "bf16", "fp16") is the autocast used around objective and stop.
    `channels_last` feeds the objective channels-last inputs (pair it with a channels-last model).
    After a call, `last_steps` holds the number of steps each example took.
    """

    def __init__(self, norm: str = "l2", eps: float = 1.0, step_size: float = 0.5, steps: int = 2,
                 random_start: bool = False, bounds: tuple[float, float] = (0.0, 1.0),
                 precision: str = "fp32", channels_last: bool = False):
        if norm not in NORMS:
            raise UserInputError(f"attack norm {norm!r}: choose one of {', '.join(NORMS)}")
        if eps < 0 or step_size < 0:
            raise UserInputError(f"attack eps {eps} and step size {step_size} must be non-negative")
        if int(steps) != steps or steps < 0:
            raise UserInputError(f"attack steps {steps}: must be a non-negative integer")
        if bounds[0] >= bounds[1]:
            raise UserInputError(f"attack bounds {bounds}: lower must be below upper")
        if precision not in PRECISIONS:
            raise UserInputError(f"attack precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.norm = norm
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.random_start = bool(random_start)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.last_steps: torch.Tensor = torch.zeros(0, dtype=torch.long)

    def __repr__(self) -> str:
        return (f"PGD(norm={self.norm!r}, eps={self.eps}, step_size={self.step_size}, steps={self.steps}, "
                f"random_start={self.random_start}, bounds={self.bounds}, precision={self.precision!r}, "
                f"channels_last={self.channels_last})")

    # ------------------------------------------------------------------ pieces

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Back into the eps ball around x0. A convex step towards x0, so the bounds still hold."""
        delta = x - x0
        if self.norm == "l2":
            factor = (self.eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
            delta = delta * factor
        else:
            delta = delta.clamp(-self.eps, self.eps)
        return x0 + delta

    def _start(self, x0: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        shape = x0.shape[1:]
        if self.norm == "l2":
            if generators is not None:
                noise = randn_per_sample(generators, shape, x0.device)
                radius = torch.stack([torch.rand((), generator=g) for g in generators]).to(x0.device)
            else:
                noise = torch.randn_like(x0, dtype=torch.float32)
                radius = torch.rand(x0.shape[0], device=x0.device)
            direction = noise / _per_example_norm(noise).clamp_min(1e-12)
            delta = direction * (self.eps * radius).view(-1, *([1] * (x0.dim() - 1)))
        else:
            if generators is not None:
                u = torch.stack([torch.rand(tuple(shape), generator=g) for g in generators]).to(x0.device)
            else:
                u = torch.rand_like(x0, dtype=torch.float32)
            delta = (2 * u - 1) * self.eps
        return (x0 + delta.to(x0.dtype)).clamp(*self.bounds)

    def _stopped(self, stop, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """The stop rule's flags at x (None: no rule, or it declined), under no_grad and the autocast."""
        if stop is None:
            return None
        with torch.no_grad(), autocast(x.device, self.precision):
            flags = stop(self._format(x)) if labels is None else stop(self._format(x), labels)
        return self._flags(flags, x, "stop()")

    @staticmethod
    def _flags(flags, x: torch.Tensor, what: str) -> torch.Tensor | None:
        if flags is None:
            return None
        flags = torch.as_tensor(flags, device=x.device).bool().view(-1)
        if flags.numel() != x.shape[0]:
            raise ValueError(f"{what} returned {flags.numel()} flags for a batch of {x.shape[0]}")
        return flags

    def _still_active(self, stop, x: torch.Tensor, active: torch.Tensor,
                      labels: torch.Tensor | None) -> torch.Tensor:
        """`active` less the rows the stop rule flags; with labels, only the active rows are checked."""
        if labels is None:
            stopped = self._stopped(stop, x)
            return active if stopped is None else active & ~stopped
        rows = active.nonzero().squeeze(1)
        stopped = self._stopped(stop, x[rows], labels[rows])
        return active if stopped is None else _deactivate(active, rows, stopped)

    def _grad(self, objective: Objective, x: torch.Tensor, labels: torch.Tensor | None = None,
              shared_stop: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The objective's gradient at x and, with shared_stop, the done flags of the same forward pass."""
        x = self._format(x.detach()).requires_grad_(True)
        done = None
        with torch.enable_grad():
            with autocast(x.device, self.precision):
                values = objective(x) if labels is None else objective(x, labels)
                if shared_stop:
                    if not (isinstance(values, tuple) and len(values) == 2):
                        raise ValueError("with stop=FROM_OBJECTIVE, objective() must return (values, done)")
                    values, done = values
                    done = self._flags(done.detach(), x, "objective()")
            if values.dim() != 1 or values.shape[0] != x.shape[0]:
                raise ValueError(f"objective() must return one value per example [{x.shape[0]}], "
                                 f"got shape {tuple(values.shape)}")
            # fp16 gradients underflow; the step is normalised, so a constant scale is free.
            scale = 1024.0 if self.precision == "fp16" else 1.0
            (grad,) = torch.autograd.grad(values.float().sum() * scale, x)
        return grad.float(), done

    def _move(self, x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """One ascent step of rows x (started at x0): up the gradient, into the bounds, into the ball."""
        return self._project((x + self.step_size * self._direction(grad)).clamp(*self.bounds), x0)

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "l2":
            return grad / _per_example_norm(grad).clamp_min(1e-12)
        return grad.sign()

    # ------------------------------------------------------------------ the attack

    def __call__(self, model: torch.nn.Module, objective: Objective, x: torch.Tensor,
                 stop: StopRule | None = None, generators: Sequence[torch.Generator] | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the detached adversarial x (same dtype as x). With `labels` ([B]), objective and
        stop take (x, labels) of the same rows. With stop=FROM_OBJECTIVE the objective returns
        (values, done), and a row flagged done at x_t stops there, as a stop rule at x_t would stop it."""
        if generators is not None and len(generators) != x.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}")
        if labels is not None and labels.shape[:1] != x.shape[:1]:
            raise ValueError(f"{tuple(labels.shape)} labels for a batch of {x.shape[0]}")
        shared = isinstance(stop, str)
        if shared and stop != FROM_OBJECTIVE:
            raise ValueError(f"stop={stop!r}: pass a callable, None or attacks.FROM_OBJECTIVE")
        # Each row's step depends on that row alone (per-example gradient, direction and projection),
        # so with labels the stopped rows can leave the batch: the rows still moving are computed alone.
        compact = labels is not None and stop is not None
        x0 = x.detach().float()
        batch = x0.shape[0]
        expand = (-1, *([1] * (x0.dim() - 1)))
        steps_taken = torch.zeros(batch, dtype=torch.long, device=x0.device)
        # Switch off parameter gradients (autograd then neither computes nor stores them) and
        # restore each flag exactly; the train/eval mode is the caller's and is left alone.
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            active = torch.ones(batch, dtype=torch.bool, device=x0.device)
            if stop is not None and not (shared and not self.random_start):  # shared: step 0 checks x0
                rule = (lambda *a: objective(*a)[1]) if shared else stop
                active = self._still_active(rule, x0, active, labels)
            x_adv = x0.clone()
            if self.random_start and self.eps > 0:
                start = self._start(x0, generators)
                x_adv = torch.where(active.view(expand), start, x_adv)
            for step in range(self.steps):
                # (without a stop rule nothing ever stops: skip the checks, each a GPU sync)
                if stop is not None and not bool(active.any()):
                    break
                if stop is not None and not shared and (step > 0 or self.random_start):  # else x_adv == x0
                    active = self._still_active(stop, x_adv, active, labels)  # once stopped, frozen for good
                    if not bool(active.any()):
                        break
                rows = active.nonzero().squeeze(1) if compact else None
                here = (x_adv, x0, labels) if rows is None else (x_adv[rows], x0[rows], labels[rows])
                grad, done = self._grad(objective, here[0], here[2], shared)
                if done is not None:  # rows real enough here stop before this step, for good
                    active = active & ~done if rows is None else _deactivate(active, rows, done)
                    if not bool(active.any()):
                        break
                moved = self._move(here[0], grad, here[1])
                if rows is None:
                    x_adv = torch.where(active.view(expand), moved, x_adv)
                else:
                    keep = slice(None) if done is None else ~done
                    x_adv = x_adv.index_copy(0, rows[keep], moved[keep])
                steps_taken += active.long()
        finally:
            for p, requires in flags:
                p.requires_grad_(requires)
        self.last_steps = steps_taken.cpu()
        return x_adv.detach().to(x.dtype)
