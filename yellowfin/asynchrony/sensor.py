"""Sensing the total momentum of a running system (docs/asynchrony.md §2).

Model the run as heavy ball with a total momentum mu_T, evaluated at the current iterate:

    x_{s+1} = x_s + mu_T (x_s - x_{s-1}) - alpha_s grad f(x_s)

Given the iterates around version ``s`` and a gradient computed *at* x_s (not the stale gradient that
was applied at step s), each coordinate i gives

    numerator_i   = x_{s+1,i} - x_{s,i} + alpha_s g_i
    denominator_i = x_{s,i} - x_{s-1,i}

and mu_T ~ numerator_i / denominator_i. The pure functions below do that arithmetic; the classes keep
the history of iterates and the time averages.
"""

from __future__ import annotations

import collections
import math

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# Pure arithmetic
# ----------------------------------------------------------------------------------------------

def momentum_residual(x_prev: Tensor, x_s: Tensor, x_next: Tensor, grad_at_s: Tensor,
                      step: float) -> tuple[Tensor, Tensor]:
    """Per-coordinate numerator and denominator of the total-momentum ratio.

    ``step`` is the step size to credit the gradient with: the algorithmic alpha_s, or the effective
    alpha_s / M of the asynchrony model.
    """
    numerator = (x_next - x_s) + step * grad_at_s
    denominator = x_s - x_prev
    return numerator, denominator


def lr_outside_correction(step_prev: float, step_s: float) -> float:
    """Factor that undoes the learning-rate-outside form (v <- mu v + g; x <- x - alpha v).

    There the displacement x_s - x_{s-1} was taken with alpha_{s-1} while the momentum term in
    x_{s+1} - x_s is scaled by alpha_s, so the raw ratio is mu * alpha_s / alpha_{s-1}.
    """
    if step_s == 0.0 or not math.isfinite(step_prev / step_s):
        return 1.0
    return step_prev / step_s


def median_ratio(numerator: Tensor, denominator: Tensor, min_abs_denominator: float = 0.0) -> float:
    """Median over coordinates of numerator / denominator, skipping near-zero denominators.

    The median keeps coordinates whose previous displacement is tiny (huge ratios) from deciding the
    answer. Returns NaN when no coordinate is usable.
    """
    usable = denominator.abs() > min_abs_denominator
    if not bool(usable.any()):
        return float("nan")
    ratios = numerator[usable] / denominator[usable]
    return float(ratios.double().median())


# ----------------------------------------------------------------------------------------------
# Coordinate subset and iterate history
# ----------------------------------------------------------------------------------------------

def random_coordinate_subset(num_coordinates: int, subset_size: int, seed: int) -> Tensor:
    """A fixed random subset of coordinate indices (sorted), the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    size = min(subset_size, num_coordinates)
    return torch.randperm(num_coordinates, generator=generator)[:size].sort().values


class MomentumSensor:
    """Estimates the total momentum mu_T of any running system from its iterates.

    Usage: after every update that produced version ``v`` (x_v), call ``record_iterate(v, x_v, step)``
    with the step size used for the update *from* x_v (record it when known; ``record_step`` can fill
    it in later). Whenever a gradient computed at version ``s`` is available, call
    ``observe(s, grad)``; it needs versions s-1, s and s+1 to be in the history.

    ``step_scale`` selects which step the gradient is credited with: 1 for the algorithmic step,
    1/M for the effective step alpha/M of the asynchrony model (docs/asynchrony.md §2).

    Two estimates are kept:
    - ``instant``: the median ratio of the latest observation, smoothed over arrivals by an EMA
      (right for exact gradients);
    - ``averaged``: per coordinate, numerator and denominator are averaged over time before the
      ratio (an EMA of n*d over an EMA of d^2, i.e. a per-coordinate least-squares fit of n = mu d),
      then the median over coordinates. This is the one to use with noisy gradients.
    ``estimate`` returns the averaged one.
    """

    def __init__(self, num_coordinates: int, subset_size: int = 512, seed: int = 0,
                 step_scale: float = 1.0, lr_outside: bool = True, history: int = 64,
                 beta: float = 0.99, instant_beta: float = 0.9, subset: Tensor | None = None):
        self.subset = subset if subset is not None else random_coordinate_subset(
            num_coordinates, subset_size, seed)
        self.step_scale = float(step_scale)
        self.lr_outside = lr_outside
        self.history = int(history)
        self.beta = float(beta)
        self.instant_beta = float(instant_beta)
        self._iterates: collections.OrderedDict[int, Tensor] = collections.OrderedDict()
        self._steps: dict[int, float] = {}
        k = self.subset.numel()
        self._avg_cross = torch.zeros(k, dtype=torch.float64)   # EMA of numerator * denominator
        self._avg_square = torch.zeros(k, dtype=torch.float64)  # EMA of denominator^2
        self._instant = 0.0
        self.observations = 0
        self.missed = 0

    # -- history --------------------------------------------------------------------------
    def select(self, flat: Tensor) -> Tensor:
        return flat.detach().reshape(-1)[self.subset].double()

    def record_iterate(self, version: int, flat_params: Tensor, step: float | None = None,
                       already_selected: bool = False) -> None:
        values = flat_params.double().clone() if already_selected else self.select(flat_params)
        self._iterates[version] = values
        if step is not None:
            self._steps[version] = float(step)
        while len(self._iterates) > self.history:
            old, _ = self._iterates.popitem(last=False)
            self._steps.pop(old, None)

    def record_step(self, version: int, step: float) -> None:
        """The step size of the update that took x_version to x_{version+1}."""
        self._steps[version] = float(step)

    def has_versions(self, s: int) -> bool:
        return all(v in self._iterates for v in (s - 1, s, s + 1)) and s in self._steps

    # -- estimation -----------------------------------------------------------------------
    def observe(self, version: int, grad: Tensor, already_selected: bool = False) -> float | None:
        """Feed a gradient computed at x_version. Returns the instantaneous median ratio, or None."""
        if not self.has_versions(version):
            self.missed += 1
            return None
        g = grad.double() if already_selected else self.select(grad)
        step_s = self._steps[version]
        numerator, denominator = momentum_residual(
            self._iterates[version - 1], self._iterates[version], self._iterates[version + 1],
            g, self.step_scale * step_s)
        if self.lr_outside and (version - 1) in self._steps:
            numerator = numerator * lr_outside_correction(self._steps[version - 1], step_s)
        return self._accumulate(numerator, denominator)

    def observe_triplet(self, x_prev: Tensor, x_s: Tensor, x_next: Tensor, grad_at_s: Tensor,
                        step: float, correction: float = 1.0) -> float | None:
        """Same as ``observe`` for callers that keep their own iterates (already on the subset)."""
        numerator, denominator = momentum_residual(x_prev.double(), x_s.double(), x_next.double(),
                                                   grad_at_s.double(), self.step_scale * step)
        return self._accumulate(numerator * correction, denominator)

    def _accumulate(self, numerator: Tensor, denominator: Tensor) -> float | None:
        if not (torch.isfinite(numerator).all() and torch.isfinite(denominator).all()):
            self.missed += 1
            return None
        b = self.beta
        self._avg_cross.mul_(b).add_((1 - b) * numerator * denominator)
        self._avg_square.mul_(b).add_((1 - b) * denominator * denominator)
        ratio = median_ratio(numerator, denominator)
        if math.isfinite(ratio):
            bi = self.instant_beta
            self._instant = bi * self._instant + (1 - bi) * ratio
        self.observations += 1
        return ratio if math.isfinite(ratio) else None

    @property
    def instant(self) -> float:
        """EMA over arrivals of the per-observation median ratio (zero-debiased); NaN before any."""
        return self._instant / (1 - self.instant_beta ** self.observations) if self.observations else float("nan")

    @property
    def averaged(self) -> float:
        """Median over coordinates of the time-averaged ratio (EMA(n d) / EMA(d^2))."""
        if self.observations == 0:
            return float("nan")
        return median_ratio(self._avg_cross, self._avg_square)

    @property
    def estimate(self) -> float:
        return self.averaged

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "subset": self.subset.clone(), "step_scale": self.step_scale, "lr_outside": self.lr_outside,
            "beta": self.beta, "instant_beta": self.instant_beta,
            "iterates": {v: t.clone() for v, t in self._iterates.items()}, "steps": dict(self._steps),
            "avg_cross": self._avg_cross.clone(), "avg_square": self._avg_square.clone(),
            "instant": self._instant, "observations": self.observations, "missed": self.missed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.subset = state["subset"].clone()
        self.step_scale = state["step_scale"]
        self.lr_outside = state["lr_outside"]
        self.beta = state["beta"]
        self.instant_beta = state["instant_beta"]
        self._iterates = collections.OrderedDict(sorted(
            (int(v), t.clone()) for v, t in state["iterates"].items()))
        self._steps = {int(v): float(a) for v, a in state["steps"].items()}
        self._avg_cross = state["avg_cross"].clone()
        self._avg_square = state["avg_square"].clone()
        self._instant = state["instant"]
        self.observations = state["observations"]
        self.missed = state["missed"]
