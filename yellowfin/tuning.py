"""The tuner's mathematics: pure functions of scalars, no parameter walking.

Every function accepts Python floats or tensors and returns float64 tensors, built from
elementwise torch operations only: no ``.item()``, no Python branch on a value. The
optimizer calls them on 0-dim tensors on the parameters' device, so tuning never
synchronises with the host; tests and notebooks call them on plain floats.

Notation (spec §1-§2): heavy ball ``x+ = x - alpha * grad + mu * (x - x-)``; ``h`` a
curvature, ``kappa = h_max / h_min``; ``C`` the gradient variance, ``D`` the distance to
the optimum.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The cubic is solved for p in this range. Below it sqrt(mu) = 1 - p^(1/3) is within 1e-10
# of 1 and float64 can no longer resolve the root next to 1; above it the root ~ 1/p is
# below 1e-30. Either way the answer no longer changes mu or alpha in any meaningful digit.
_P_MIN, _P_MAX = 1e-30, 1e30
_NEWTON_STEPS = 4


def _f64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def cubic_root(p) -> Tensor:
    """The real root x in (0, 1) of (1 - x)^3 = p x, for p > 0.

    Vieta's closed form is exact in theory but cancels catastrophically for large p, so it
    is used as a starting point only where it is accurate (p <= 1); for p > 1 the start is
    1 / (p + 3) (one Newton step from 0). A few Newton steps then polish the root: the
    residual is convex and decreasing on (0, 1), so they converge monotonically.
    """
    p = _f64(p).clamp(_P_MIN, _P_MAX)
    small = p.clamp(max=1.0)  # keep the unused branch of the where() finite
    w3 = -small * (1.0 + torch.sqrt(1.0 + 4.0 * small / 27.0)) / 2.0  # = (-sqrt(p^2 + 4p^3/27) - p) / 2
    w = -torch.pow(-w3, 1.0 / 3.0)  # real cube root of a negative number
    vieta = 1.0 + w - small / (3.0 * w)
    x = torch.where(p <= 1.0, vieta, 1.0 / (p + 3.0))
    for _ in range(_NEWTON_STEPS):
        u = 1.0 - x
        residual = u * u * u - p * x
        slope = -3.0 * u * u - p
        x = x - residual / slope
    return x.clamp(0.0, 1.0)


def optimal_momentum(kappa) -> Tensor:
    """Classic optimal heavy-ball momentum for condition number kappa: ((sqrt k - 1)/(sqrt k + 1))^2."""
    root = torch.sqrt(_f64(kappa))
    return ((root - 1.0) / (root + 1.0)) ** 2


def robust_lr_range(mu, h) -> tuple[Tensor, Tensor]:
    """Learning rates for which heavy ball on curvature h has spectral radius exactly sqrt(mu)."""
    root, h = torch.sqrt(_f64(mu)), _f64(h)
    return (1.0 - root) ** 2 / h, (1.0 + root) ** 2 / h


def spectral_radius(alpha, mu, h) -> Tensor:
    """Spectral radius of the heavy-ball operator [[1 - alpha h + mu, -mu], [1, 0]].

    Its eigenvalues solve z^2 - b z + mu = 0 with b = 1 - alpha h + mu. Complex pairs
    (b^2 < 4 mu) have modulus sqrt(mu); that is the robust region.
    """
    alpha, mu, h = _f64(alpha), _f64(mu), _f64(h)
    b = 1.0 - alpha * h + mu
    disc = b * b - 4.0 * mu
    real_disc = disc.clamp(min=0.0)
    real_radius = (b.abs() + torch.sqrt(real_disc)) / 2.0
    complex_radius = torch.sqrt(mu.abs())
    return torch.where(disc < 0.0, complex_radius, real_radius)


def single_step(h_min, h_max, grad_var, dist, eps=0.0) -> tuple[Tensor, Tensor]:
    """SingleStep (spec §2, with the §4.4 guards): the momentum and learning rate minimising
    mu D^2 + alpha^2 C subject to the curvature range fitting the robust region.

    Returns (mu, alpha). With eps = 0 this is the textbook rule; the optimizer passes its eps
    so that zero variance or zero curvature cannot divide by zero.
    """
    h_min, h_max, grad_var, dist = map(_f64, (h_min, h_max, grad_var, dist))
    h_lo = h_min + eps
    p = (dist + eps) ** 2 * h_lo**2 / (2.0 * (grad_var + eps))
    kappa = torch.clamp((h_max + eps) / h_lo, min=1.0 + eps)
    root_kappa = torch.sqrt(kappa)
    # Compare square roots of mu directly: squaring and rooting again would lose digits.
    sqrt_mu = torch.maximum(cubic_root(p), (root_kappa - 1.0) / (root_kappa + 1.0))
    alpha = (1.0 - sqrt_mu) ** 2 / h_lo
    return sqrt_mu**2, alpha


def slow_start(alpha, step, window) -> Tensor:
    """Ramp the learning rate over the first 10 windows: alpha * min(1, (t + 1) / (10 w))."""
    return _f64(alpha) * torch.clamp((_f64(step) + 1.0) / (10.0 * window), max=1.0)


def tune(estimates, step, previous_mu, previous_lr, settings) -> tuple[Tensor, Tensor]:
    """The tuner's choice of (mu, alpha) at step t from the current estimates (spec §4.4).

    ``estimates`` is (h_min, h_max, grad_var, dist); ``settings`` a ``TunerSettings``. At
    t = 0 the initial values hold; afterwards SingleStep, then the slow-start ramp, then (paper
    variant) exponential smoothing of mu and alpha themselves.
    """
    mu, alpha = single_step(*estimates, eps=settings.eps)
    if settings.slow_start:
        alpha = slow_start(alpha, step, settings.curvature_window)
    if settings.smooth_tuned:
        beta = settings.beta
        mu = beta * previous_mu + (1.0 - beta) * mu
        alpha = beta * previous_lr + (1.0 - beta) * alpha
    started = _f64(step) >= 1.0
    return (
        torch.where(started, mu, float(settings.initial_momentum)),
        torch.where(started, alpha, float(settings.initial_lr)),
    )
