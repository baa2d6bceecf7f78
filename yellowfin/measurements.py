"""Measure: the estimator recursions (docs/algorithm.md §3): curvature range, gradient variance,
distance to optimum.

Pure functions on 0-dim float64 tensors. The first pass over the tensors (``passes``) reduces each
step's gradients to ``Sums``; the tuning step (``tuning.tune_step``) turns them into a
``GradientSample`` (a handful of scalars); ``measure`` folds it into the tuner's state and returns
the current ``Estimates``. The scale-free tuner's own measurements (§8), the distance travelled and the
secant curvature along the last step, are read from the same sums. Nothing here walks parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .state import TunerSettings, TunerState


class Sums(NamedTuple):
    """What the first pass reduces from the tensors: everything the tuner needs from them.

    The field order is the layout of the float64 vector that the passes produce, that is summed over
    tensors, scopes' batches and (with ``shard_group``) ranks, and that the tuning step reads:
    build and read that vector only through ``vector`` and ``from_vector``.
    """

    sq_norm: Tensor  # ||g||^2
    cross: Tensor  # <gbar, g>, with gbar before this step's update
    grad_avg_sq_norm: Tensor  # ||gbar||^2, before this step's update
    nonzero: Tensor  # non-zero gradient entries (only counted with the sparsity correction)
    numel: Tensor  # gradient entries
    # Read by the scale-free tuner only (zeros for the reference), with x, x_0 and v before this step's update
    # and lr each tensor's group multiplier (the passes sum them unweighted; ``weighted_by_lr`` weights them):
    grad_dot_step: Tensor  # sum lr <g, v>
    step_sq_norm: Tensor  # sum lr^2 ||v||^2
    grad_sq_norm_lr: Tensor  # sum lr ||g||^2
    displacement_sq: Tensor  # ||x - x_0||^2
    initial_param_sq_norm: Tensor  # ||x_0||^2 (not read from x_0 by the passes: from the norms the optimizer keeps)
    grad_dot_displacement: Tensor  # <g, x - x_0>, a pairing of a gradient with a displacement: any metric's
    # Read by the preconditioned tuner only (zeros otherwise). In its metric M (docs/algorithm.md §9) sq_norm is
    # ||g||^2_(M^-1) = sum g^2 / M and displacement_sq is ||x - x_0||^2_M = sum M (x - x_0)^2; besides those:
    grad_dot_momentum: Tensor  # <g / sqrt(M), v>, with v the momentum buffer before this step's update
    metric_sum: Tensor  # sum M, over every entry

    @classmethod
    def zeros(cls, like: Tensor) -> "Sums":
        """Every sum zero, as 0-dim float64 tensors on ``like``'s device."""
        zero = torch.zeros((), dtype=torch.float64, device=like.device)
        return cls(*(zero,) * len(cls._fields))

    def weighted_by_lr(self, lr) -> "Sums":
        """These sums of one group's tensors, with the lr-weighted fields weighted by the group's ``lr``."""
        if isinstance(lr, Tensor):  # (a one-element tensor of any shape and dtype, possibly on another device)
            lr = lr.detach().reshape(()).to(self.grad_dot_step)
        return self._replace(
            grad_dot_step=lr * self.grad_dot_step, step_sq_norm=lr * lr * self.step_sq_norm,
            grad_sq_norm_lr=lr * self.grad_sq_norm_lr,
        )

    def lead_per_lr(self, lr) -> "Sums":
        """These sums of one group's tensors in primal-average form in Adam's metric, with <g, w> divided by the
        group's ``lr`` (0 where lr is 0): its lead w moved by lr times the steps the tuner sums
        (``measure_signal_along_lead``)."""
        if isinstance(lr, Tensor):
            lr = lr.detach().reshape(()).to(self.grad_dot_momentum)
            return self._replace(grad_dot_momentum=torch.where(lr > 0.0, self.grad_dot_momentum / lr, 0.0))
        return self._replace(grad_dot_momentum=self.grad_dot_momentum / lr if lr > 0.0
                             else torch.zeros_like(self.grad_dot_momentum))

    def vector(self) -> Tensor:
        """The sums as one float64 vector in field order (all fields 0-dim, on one device)."""
        return torch.stack(tuple(self))

    @classmethod
    def from_vector(cls, vector: Tensor) -> "Sums":
        return cls(*vector.unbind(-1))


class GradientSample(NamedTuple):
    """One step's gradient, reduced to scalars (after weight decay and clipping for statistics)."""

    sq_norm: Tensor  # ||g_t||^2, the curvature sample h_t
    grad_avg_sq_norm: Tensor  # ||gbar||^2 of the raw (not debiased) gradient average, after this step
    density: Tensor  # fraction of non-zero entries (1 when the sparsity correction is off)


class Estimates(NamedTuple):
    h_min: Tensor
    h_max: Tensor
    grad_var: Tensor  # C
    dist: Tensor  # D


def averaged_sq_norm(
    avg_sq_norm: Tensor, cross: Tensor, sq_norm: Tensor, decay: Tensor, weight: Tensor
) -> Tensor:
    """||decay * gbar + weight * g||^2 from ||gbar||^2, <gbar, g> and ||g||^2.

    This lets one pass over memory reduce everything the tuner needs before the average is written.
    """
    cross = within_cauchy_schwarz(cross, avg_sq_norm, sq_norm)
    value = decay**2 * avg_sq_norm + 2.0 * decay * weight * cross + weight**2 * sq_norm
    return torch.clamp(value, min=0.0)


def within_cauchy_schwarz(dot: Tensor, sq_norm_a: Tensor, sq_norm_b: Tensor) -> Tensor:
    """A dot product <a, b> brought back inside its bound ||a|| ||b||, from the float64 squared norms: the
    multi-tensor passes form a dot's products in the tensors' dtype, which can overflow (to inf, or NaN where
    +inf meets -inf) in low precision where the norms, accumulated in float64, do not."""
    bound = torch.sqrt(sq_norm_a * sq_norm_b)
    dot = torch.where(torch.isnan(dot), 0.0, dot)
    return torch.minimum(torch.maximum(dot, -bound), bound)


def ema(average: Tensor, value: Tensor, beta: float) -> Tensor:
    return beta * average + (1.0 - beta) * value


def debias_factor(step: Tensor, beta: float) -> Tensor:
    """1 - beta^(t+1): divide an average started at zero by this after t + 1 updates."""
    return 1.0 - beta ** (step + 1.0)


def curvature_range(curvatures: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """(min, max) over the samples seen so far in the ring buffer (at most its length)."""
    window = curvatures.shape[0]
    seen = torch.arange(window, device=curvatures.device) <= step  # slot i filled once t >= i
    inf = torch.tensor(float("inf"), dtype=curvatures.dtype, device=curvatures.device)
    return torch.where(seen, curvatures, inf).amin(), torch.where(seen, curvatures, -inf).amax()


def measure(state: TunerState, sample: GradientSample, settings: TunerSettings) -> tuple[TunerState, Estimates]:
    """Fold one gradient sample into the averages; return the new state and current estimates.

    ``state.step`` is t, the index of this sample; the returned state keeps it (the optimizer
    advances it once the update is applied).
    """
    beta, eps, t = settings.beta, settings.measurement_eps, state.step
    debias = debias_factor(t, beta)

    # Curvature range: extremes over a sliding window, smoothed in log (or linear) space.
    slot = torch.arange(settings.curvature_window, device=t.device) == torch.remainder(t, settings.curvature_window)
    curvatures = torch.where(slot, sample.sq_norm, state.curvatures)
    window_min, window_max = curvature_range(curvatures, t)
    if settings.curvature_smoothing == "log":
        h_max_avg = ema(state.h_max_avg, torch.log(window_max + eps), beta)
        h_min_avg = ema(state.h_min_avg, torch.log(window_min + eps), beta)
        h_max, h_min = torch.exp(h_max_avg / debias), torch.exp(h_min_avg / debias)
    else:
        h_max_avg = ema(state.h_max_avg, window_max, beta)
        h_min_avg = ema(state.h_min_avg, window_min, beta)
        h_max, h_min = h_max_avg / debias, h_min_avg / debias

    # Variance: E||g||^2 - ||E g||^2, floored at eps (relative to E||g||^2 for the scale-free tuner).
    grad_sq_avg = ema(state.grad_sq_avg, sample.sq_norm, beta)
    grad_sq = grad_sq_avg / debias
    grad_var = grad_sq - sample.grad_avg_sq_norm / debias**2
    grad_var = torch.maximum(grad_var, eps * grad_sq) if settings.scale_free else torch.clamp(grad_var, min=eps)

    # Distance to the optimum: E||g|| / E||g||^2, i.e. ||g|| / h for a quadratic.
    grad_norm_avg = ema(state.grad_norm_avg, torch.sqrt(sample.sq_norm), beta)
    dist_avg = ema(state.dist_avg, (grad_norm_avg / debias) / (grad_sq + eps), beta)
    dist = dist_avg / debias

    density_avg = ema(state.density_avg, sample.density, beta)
    if settings.sparsity_correction:
        # Sparse updates see only a fraction of the coordinates each step (embeddings).
        density = density_avg / debias
        h_min, h_max, grad_var = density * h_min, density * h_max, density * grad_var
        dist = dist / (torch.sqrt(density) + eps)

    new_state = state.replace(
        curvatures=curvatures, h_max_avg=h_max_avg, h_min_avg=h_min_avg, grad_sq_avg=grad_sq_avg,
        grad_norm_avg=grad_norm_avg, dist_avg=dist_avg, density_avg=density_avg,
        h_min=h_min, h_max=h_max, grad_var=grad_var, dist=dist,
    )
    return new_state, Estimates(h_min, h_max, grad_var, dist)


# --------------------------------------------------------------------------------- scale-free tuner
def distance_travelled(state: TunerState, sums: Sums, settings: TunerSettings, climbing=False) -> Tensor:
    """d = max(d_prev, ||x - x_0||), from r (1 + ||x_0||) at t = 0 (DoG's start, r = settings.initial_distance):
    a parameter-unit length; d_prev where ``climbing`` (``measure_climb``) holds the distance.

    Preconditioned, the norm is the metric's (``sums.displacement_sq`` holds ||x - x_0||^2_M), and the start is
    carried into its units by the root of the metric's mean."""
    initial = settings.initial_distance * (1.0 + torch.sqrt(sums.initial_param_sq_norm))
    if settings.preconditioned:
        initial = initial * torch.sqrt(sums.metric_sum / sums.numel)
    previous = torch.where(state.step >= 1.0, state.distance, initial)
    return torch.where(climbing, previous, torch.maximum(previous, torch.sqrt(sums.displacement_sq)))


def measure_climb(state: TunerState, sums: Sums, settings: TunerSettings) -> tuple[Tensor, Tensor]:
    """(the running mean of cos(g, x - x_0), whether the distance is held): with ``settings.hold_distance_uphill``,
    held where that mean, over the tuner's memory, is above 0.

    DoG's distance max ||x - x_0|| stands for the distance to a solution only while the run still descends along the
    way it travelled. Where the loss rises along it (the gradient leans on average toward x - x_0, the run has gone
    past the minimum along its own line), a larger ||x - x_0|| is the run leaving, not a solution farther away: DoWG's
    runaway near interpolation, whose step grows with the distance it travels uphill (docs/tuner.md §16). A cosine
    of a gradient with a displacement (in the metric's norms where preconditioned: ||g||_(M^-1) ||x - x_0||_M bounds
    the pairing), so free of the loss's and the parameters' scales. No sample where x = x_0 or g = 0."""
    measured = (sums.displacement_sq > 0.0) & (sums.sq_norm > 0.0)
    norms = torch.sqrt(torch.where(measured, sums.sq_norm * sums.displacement_sq, 1.0))
    cosine = within_cauchy_schwarz(sums.grad_dot_displacement, sums.sq_norm, sums.displacement_sq) / norms
    average = torch.where(measured, ema(state.climb_avg, cosine, settings.beta), state.climb_avg)
    return average, (average > 0.0) & settings.hold_distance_uphill


def measure_secant(state: TunerState, sums: Sums, grad_var: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(s_avg, q_avg, h): the running averages of the secant along the last step, and their ratio h.

    The last update moved x by -alpha_prev lr v (v the momentum buffer now), so with P = <g_prev, lr v>
    (remembered from the previous step) the secant <g - g_prev, x - x_prev> is alpha_prev (P - <g, lr v>),
    from scalars alone. g_prev's own noise is in the step: E<g - g_prev, x - x_prev> is the curvature
    term plus alpha_prev lr s_prev C, which is removed. q = ||x - x_prev||^2 = alpha_prev^2 ||lr v||^2.
    Both in loss units (s) and parameter^2 (q): h = s_avg / q_avg is a curvature in loss / parameter^2,
    whatever the loss scale. h = 0 while unmeasured (t = 0, or no positive curvature seen yet).
    """
    started = state.step >= 1.0
    alpha_prev = state.alpha
    secant = alpha_prev * (state.prev_grad_dot_next_step - sums.grad_dot_step) - state.prev_step_noise_weight * grad_var
    step_sq = alpha_prev**2 * sums.step_sq_norm
    secant, step_sq = torch.where(started, secant, 0.0), torch.where(started, step_sq, 0.0)
    weight = (1.0 - beta) / debias_factor(state.step, beta)  # bias-corrected: a plain mean at first
    secant_avg = (1.0 - weight) * state.secant_num_avg + weight * secant
    step_sq_avg = (1.0 - weight) * state.secant_den_avg + weight * step_sq
    measured = (secant_avg > 0.0) & (step_sq_avg > 0.0)
    curvature = torch.where(measured, secant_avg / torch.where(measured, step_sq_avg, 1.0), 0.0)
    return secant_avg, step_sq_avg, curvature


# --------------------------------------------------------------------------------- the preconditioned tuner
# Adam's metric (docs/algorithm.md §9): M = sqrt(P / (1 - b2^t)) + METRIC_EPS mean(M_prev), with P the running
# average of g^2 at memory SECOND_MOMENT_BETA (Adam's), ~1000 steps: ten times the tuner's ~100, so that the metric
# the tuner measures in holds still over the tuner's own memory. The eps is relative to the metric's mean over the
# whole scope at the last step (TunerState.metric_mean), so that it scales with the loss as M does (Adam's absolute
# eps is a loss scale of its own) and does not depend on how the tensors are split or sharded.
SECOND_MOMENT_BETA = 0.999
METRIC_EPS = 1e-8


def next_second_moment(second_moment: Tensor, grad: Tensor) -> Tensor:
    """P <- b2 P + (1 - b2) g^2 (one tensor)."""
    return second_moment * SECOND_MOMENT_BETA + grad * grad * (1.0 - SECOND_MOMENT_BETA)


def adam_metric(second_moment: Tensor, steps: Tensor, floor: Tensor) -> Tensor:
    """M of one tensor from its average P of g^2 after ``steps`` updates (a 0-dim tensor): sqrt(P) debiased, plus
    ``floor`` (METRIC_EPS times the last metric mean, ``metric_floor``). An entry that is still zero (no gradient
    yet, before any floor) reads 1: its g and v are zero there too."""
    root = torch.sqrt(second_moment / (1.0 - SECOND_MOMENT_BETA ** torch.clamp(steps, min=1.0)))
    metric = root + floor.to(root)
    return torch.where(metric > 0.0, metric, 1.0)


def metric_floor(state: TunerState) -> Tensor:
    """The eps added to Adam's metric at this step: METRIC_EPS times its mean at the last step (0 at the first)."""
    return METRIC_EPS * state.metric_mean


def measure_signal_lag_one(
    state: TunerState, measured: TunerState, sums: Sums, grad_scale: Tensor, settings: TunerSettings
) -> TunerState:
    """``measured`` with the signal ||E g||^2 and the variance C read from the momentum buffer (no gradient average).

    Two gradients with independent noise have E<g_t, g_(t-1)> = ||E g||^2 while the mean drifts slowly, so the
    running mean of <g_t, g_(t-1)> at the tuner's memory is the signal S, and C = E||g||^2 - max(S, 0) (at least
    ``measurement_eps`` of E||g||^2). g_(t-1) itself is not kept: v_(t-1) = m_(t-1) v_(t-2) + g_(t-1) gives
    <g_t, g_(t-1)> = <g_t, v_(t-1)> - m_(t-1) <g_t, v_(t-2)>, and <g_t, v_(t-2)> is read as <g_(t-1), v_(t-2)>,
    measured a step ago (``carried_grad_dot_momentum``, with m_(t-1)). Gradients as they enter v: times
    ``grad_scale``. (``resolved_signal_to_noise`` turns the two into the momentum rule's ratio.)
    """
    grad_dot_momentum = grad_scale * sums.grad_dot_momentum
    measured = _signal_from_samples(state, measured, grad_dot_momentum - state.carried_grad_dot_momentum, settings)
    return measured.replace(carried_grad_dot_momentum=grad_dot_momentum)


def measure_signal_along_lead(
    state: TunerState, measured: TunerState, sums: Sums, grad_scale: Tensor, settings: TunerSettings
) -> TunerState:
    """``measured`` with the signal and the variance read along the primal-average form's lead w = z - xbar, which
    is what that form keeps instead of heavy ball's v (docs/algorithm.md §11).

    w sums the steps of z with the average's decay: w_t = (1 - c_t)(w_(t-1) - eta_t s_t M^-1 g_t), and
    ``state.lead_step_sum`` W_t = (1 - c_t)(W_(t-1) + eta_t s_t) sums the same steps' sizes. So -<g_t, w_(t-1)> /
    W_(t-1) (``sums.grad_dot_momentum`` holds <g, w>, each group's divided by its lr) is a weighted mean of the lagged
    products <g_t, g_k>_(M^-1) over the average's window: ||E g||^2 where the mean gradient holds still over that
    window, less where it turns. Its noise is a small fraction of the lag-one product's (the window averages it).
    Gradients as they enter z: times ``grad_scale``. No sample before w holds a step (W = 0).
    """
    lead_sum = state.lead_step_sum
    sample = -grad_scale * sums.grad_dot_momentum / torch.where(lead_sum > 0.0, lead_sum, 1.0)
    return _signal_from_samples(state, measured, torch.where(lead_sum > 0.0, sample, 0.0), settings)


def _signal_from_samples(state: TunerState, measured: TunerState, sample: Tensor, settings: TunerSettings
                         ) -> TunerState:
    """``measured`` with ``signal_avg``, the running mean of the signal's samples at the tuner's memory (bias-corrected,
    its first sample, at t = 1, taken whole; at t = 0 there is none: the signal 0), and the variance
    C = E||g||^2 - max(S, 0), at least ``measurement_eps`` of E||g||^2."""
    beta = settings.beta
    weight = torch.where(state.step <= 1.0, 1.0, (1.0 - beta) / debias_factor(state.step, beta))
    signal = torch.where(state.step >= 1.0, (1.0 - weight) * state.signal_avg + weight * sample, 0.0)
    grad_sq = measured.grad_sq_avg / debias_factor(state.step, beta)
    grad_var = torch.maximum(grad_sq - torch.clamp(signal, min=0.0), settings.measurement_eps * grad_sq)
    return measured.replace(signal_avg=signal, grad_var=grad_var)


def averaged_noise_fraction(step: Tensor, beta: float) -> Tensor:
    """r = sum_k w_k^2 for the bias-corrected running average of t + 1 samples at memory beta: the fraction of
    independent noise that such an average keeps, (1 - beta)(1 - beta^(2n)) / ((1 + beta)(1 - beta^n)^2), n = t + 1
    (1 for one sample, (1 - beta)/(1 + beta) in the long run)."""
    n = step + 1.0
    return (1.0 - beta) * (1.0 - beta ** (2.0 * n)) / ((1.0 + beta) * (1.0 - beta**n) ** 2)


def resolved_signal_to_noise(measured: TunerState, step: Tensor, settings: TunerSettings) -> Tensor:
    """The signal-to-noise ratio p of the momentum rule from the signal S and variance C read along the momentum
    (``measure_signal_lag_one``), at the resolution of the tuner's memory.

    A running average of the gradient over that memory keeps a fraction r of the noise (``averaged_noise_fraction``),
    so it reads S + r C as the signal and (1 - r) C as the noise: that is what the scale-free tuner's gradient
    average measures (in expectation, for independent noise), and what keeps p away from 0, where mu would be 1,
    when S is below what the memory can resolve. S is taken as at least 0.
    """
    signal, noise = torch.clamp(measured.signal_avg, min=0.0), measured.grad_var
    resolution = averaged_noise_fraction(step, settings.beta)
    unresolved = torch.maximum((1.0 - resolution) * noise, settings.measurement_eps * noise)
    return (signal + resolution * noise) / (2.0 * unresolved)
