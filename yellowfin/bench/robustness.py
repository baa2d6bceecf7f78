"""The robustness of the momentum operator, measured (docs/algorithm.md §1).

(a) On a 1-D quadratic with curvature h, heavy ball converges at rate sqrt(mu) for every learning rate in the
    robust region [(1 - sqrt mu)^2 / h, (1 + sqrt mu)^2 / h]: the measured rate is flat there.
(b) On a quadratic whose curvatures span [h_min, h_max], alpha = (1 - sqrt mu)^2 / h_min puts every curvature in
    the robust region once mu >= ((sqrt kappa - 1)/(sqrt kappa + 1))^2, and the rate is sqrt(mu).

Rates are measured by running torch.optim.SGD with momentum (the same operator: v <- mu v + g, x <- x - alpha v)
in float64 and fitting the geometric decay of the iterate norm; the theory curves come from yellowfin.tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from yellowfin import tuning

MOMENTA = (0.0, 0.25, 0.5, 0.75, 0.9)
MAX_STEPS = 300
_TINY, _HUGE = 1e-250, 1e250


def measured_rate(alpha: float, mu: float, curvatures: Sequence[float], steps: int = MAX_STEPS) -> float:
    """Asymptotic rate of heavy ball on f(x) = 1/2 sum_i h_i x_i^2, from the decay of ||(x_t, x_{t-1})||.

    Runs until the norm under- or overflows float64 (or `steps`), then fits the rate on the second half of the
    trajectory, past the transient."""
    h = torch.tensor(list(curvatures), dtype=torch.float64)
    x = torch.ones_like(h, requires_grad=True)
    optimizer = torch.optim.SGD([x], lr=alpha, momentum=mu)
    previous = x.detach().clone()
    log_norms = [math.log(float(torch.cat([x.detach(), previous]).norm()))]
    for _ in range(steps):
        previous = x.detach().clone()
        optimizer.zero_grad()
        (0.5 * (h * x * x).sum()).backward()
        optimizer.step()
        norm = float(torch.cat([x.detach(), previous]).norm())
        if not (_TINY < norm < _HUGE):
            break
        log_norms.append(math.log(norm))
    n = len(log_norms) - 1
    if n < 4:
        return 0.0 if len(log_norms) and norm <= _TINY else math.inf
    mid = n // 2
    return math.exp((log_norms[n] - log_norms[mid]) / (n - mid))


def theory_rate(alpha: float, mu: float, curvatures: Sequence[float]) -> float:
    """Largest spectral radius of the heavy-ball operator over the curvatures."""
    return max(float(tuning.spectral_radius(alpha, mu, h)) for h in curvatures)


@dataclass
class RobustnessData:
    alphas: np.ndarray
    momenta: tuple[float, ...]
    measured: dict[float, np.ndarray]  # panel (a): mu -> measured rate per alpha (h = 1)
    theory: dict[float, np.ndarray]
    sweep_mu: np.ndarray  # panel (b)
    sweep_measured: np.ndarray
    sweep_theory: np.ndarray
    h_min: float
    h_max: float


def compute(momenta: Sequence[float] = MOMENTA, n_alphas: int = 31, h_min: float = 1.0, h_max: float = 100.0,
            n_curvatures: int = 20, n_mu: int = 25, steps: int = MAX_STEPS) -> RobustnessData:
    alphas = np.logspace(-2.5, math.log10(4.0), n_alphas)
    measured = {mu: np.array([measured_rate(a, mu, [1.0], steps) for a in alphas]) for mu in momenta}
    theory = {mu: np.array([theory_rate(a, mu, [1.0]) for a in alphas]) for mu in momenta}
    curvatures = np.geomspace(h_min, h_max, n_curvatures)
    sweep_mu = np.linspace(0.05, 0.95, n_mu)
    tuned_alpha = [(1 - math.sqrt(mu)) ** 2 / h_min for mu in sweep_mu]
    sweep_measured = np.array([measured_rate(a, mu, curvatures, steps) for a, mu in zip(tuned_alpha, sweep_mu)])
    sweep_theory = np.array([theory_rate(a, mu, curvatures) for a, mu in zip(tuned_alpha, sweep_mu)])
    return RobustnessData(alphas, tuple(momenta), measured, theory, sweep_mu, sweep_measured, sweep_theory,
                          h_min, h_max)


def plot(data: RobustnessData, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(data.momenta)))
    for mu, color in zip(data.momenta, colors):
        low, high = (float(v) for v in tuning.robust_lr_range(mu, 1.0))
        if mu > 0:
            left.axvspan(low, high, color=color, alpha=0.08)
        left.plot(data.alphas, np.minimum(data.theory[mu], 1.6), color=color, lw=1.5, label=f"theory, mu={mu:g}")
        left.plot(data.alphas, np.minimum(data.measured[mu], 1.6), "o", color=color, ms=3.5,
                  label=f"measured, mu={mu:g}")
        left.axhline(math.sqrt(mu), color=color, ls=":", lw=0.8)
    left.set_xscale("log")
    left.set_ylim(0, 1.6)
    left.axhline(1.0, color="red", lw=0.6)  # above: divergence (values clipped at 1.6)
    left.set_xlabel("learning rate alpha (curvature h = 1)")
    left.set_ylabel("convergence rate (per step)")
    left.set_title("(a) rate vs learning rate: flat at sqrt(mu) on the robust region (shaded)")
    left.legend(fontsize=7, ncol=2, loc="lower left")

    kappa = data.h_max / data.h_min
    mu_star = float(tuning.optimal_momentum(kappa))
    right.plot(data.sweep_mu, np.minimum(data.sweep_theory, 1.6), color="C0", lw=1.5,
               label="theory (max over curvatures)")
    right.plot(data.sweep_mu, np.minimum(data.sweep_measured, 1.6), "o", color="C1", ms=4, label="measured")
    right.plot(data.sweep_mu, np.sqrt(data.sweep_mu), ":", color="gray", label="sqrt(mu)")
    right.axvline(mu_star, color="k", ls="--", lw=0.8, label=f"mu* = {mu_star:.3f} (kappa = {kappa:g})")
    right.set_xlabel("momentum mu, with alpha = (1 - sqrt mu)^2 / h_min")
    right.set_ylabel("convergence rate (per step)")
    right.set_ylim(0, 1.6)
    right.axhline(1.0, color="red", lw=0.6)
    right.set_title(f"(b) curvatures in [{data.h_min:g}, {data.h_max:g}]: rate sqrt(mu) once mu >= mu*")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def robust_region_flatness(data: RobustnessData) -> dict[float, float]:
    """For each mu > 0: the largest |measured rate - sqrt(mu)| over learning rates inside the robust region."""
    deviations = {}
    for mu in data.momenta:
        if mu == 0:
            continue
        low, high = (float(v) for v in tuning.robust_lr_range(mu, 1.0))
        inside = (data.alphas > low * 1.001) & (data.alphas < high * 0.999)
        if inside.any():
            deviations[mu] = float(np.max(np.abs(data.measured[mu][inside] - math.sqrt(mu))))
    return deviations
