"""Tune: the tuner's decisions, pure functions of scalars, no parameter walking.

SingleStep and its parts (docs/algorithm.md §1-§2, §4.4), and ``tune_step``, everything one step
does between the two passes over the tensors: the gates (§4.7), clipping (§4.2, §4.5), measuring
(``measurements``), tuning, the applied momentum and the coefficients of the update (§4.6); and the
scale-free tuner's choice of (mu, alpha) (§8, ``tune_scale_free``), which replaces SingleStep's there.

Every function accepts Python floats or tensors and returns float64 tensors, built from
elementwise torch operations only: no ``.item()``, no Python branch on a value. The
optimizer calls them on 0-dim tensors on the parameters' device, so tuning never
synchronises with the host; tests and notebooks call them on plain floats.

Notation (docs/algorithm.md §1-§2): heavy ball ``x+ = x - alpha * grad + mu * (x - x-)``; ``h`` a
curvature, ``kappa = h_max / h_min``; ``C`` the gradient variance, ``D`` the distance to
the optimum. ``alpha`` is always the tuned step (before a group's ``lr`` multiplier).
"""

from __future__ import annotations

import math

from typing import NamedTuple

import torch
from torch import Tensor

from . import measurements
from .measurements import Sums
from .state import TunerSettings, TunerState

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
    """SingleStep (docs/algorithm.md §2, with the §4.4 guards): the momentum and learning rate minimising
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


def tune(estimates, step, previous_mu, previous_alpha, settings) -> tuple[Tensor, Tensor]:
    """The tuner's choice of (mu, alpha) at step t from the current estimates (docs/algorithm.md §4.4).

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
        alpha = beta * previous_alpha + (1.0 - beta) * alpha
    started = _f64(step) >= 1.0
    return (
        torch.where(started, mu, float(settings.initial_momentum)),
        torch.where(started, alpha, float(settings.initial_lr)),
    )


# --------------------------------------------------------------------------------- the scale-free tuner
# The step may grow by at most this factor per step (from DoG's first move, as fast as the estimates allow).
MAX_STEP_GROWTH = 2.0
# step_rule="dowg_neutral": DoWG's step times this, 1 / sqrt(2), derived (tune_scale_free), not chosen.
NEUTRAL_DOWG_FACTOR = 1.0 / math.sqrt(2.0)


def tune_scale_free(
    state: TunerState, measured: TunerState, sums: Sums, sample: measurements.GradientSample, settings: TunerSettings,
    grad_scale=1.0,
) -> TunerState:
    """The scale-free tuner's (mu, alpha) at step t (docs/algorithm.md §8), in ``measured``, the state after
    ``measurements.measure`` (``state`` is the one before it).

    Every quantity is in loss and parameter units, so multiplying the loss by c leaves mu and the
    parameters' trajectory unchanged and scales alpha by 1/c: the condition number is the ratio of
    gradient norms (||g|| ranges over [h_min d, h_max d] on a quadratic), the momentum rule reads the
    gradient's signal-to-noise ratio ||E g||^2 / (2 C). With ``step_rule="dog"`` the effective step
    alpha / (1 - mu) is DoG's d / sqrt(sum_t ||g_t||^2), with "dowg" DoWG's d^2 / sqrt(sum_t d_t^2 ||g_t||^2);
    with "secant", alpha is the smaller of the secant step
    (the curvature along the last steps, ``measurements.measure_secant``) and the distance step. Preconditioned
    (``settings.precondition``), every norm is the metric's, the signal is read from the momentum buffer
    (``measurements.measure_signal_lag_one``; ``grad_scale`` is the factor on g in v) or, in primal-average form,
    along the form's lead (``measurements.measure_signal_along_lead``), by default with the
    "dowg_neutral" rule, DoWG's step divided by sqrt(2) (§9).
    """
    started = state.step >= 1.0
    kappa = torch.sqrt(measured.h_max / measured.h_min)
    root_kappa = torch.sqrt(kappa)
    debias = measurements.debias_factor(state.step, settings.beta)
    if settings.preconditioned:
        measure_signal = (measurements.measure_signal_along_lead if settings.momentum_form == "primal_average"
                          else measurements.measure_signal_lag_one)
        measured = measure_signal(state, measured, sums, _f64(grad_scale), settings)
        signal_to_noise = measurements.resolved_signal_to_noise(measured, state.step, settings)
    else:
        signal_to_noise = (sample.grad_avg_sq_norm / debias**2) / (2.0 * measured.grad_var)
    sqrt_mu = torch.maximum(cubic_root(signal_to_noise), (root_kappa - 1.0) / (root_kappa + 1.0))
    contraction = (1.0 - sqrt_mu) ** 2

    climb_avg, climbing = measurements.measure_climb(state, sums, settings)
    distance = measurements.distance_travelled(state, sums, settings, climbing)
    # DoWG weighs each ||g_s||^2 by the squared distance d_s^2 reached when it came, so that the large gradients of
    # a start from a tiny distance count for little once the run has moved; its step d^2 / sqrt(sum d_s^2 ||g_s||^2)
    # has DoG's units (parameter over gradient).
    distance_weighted = settings.step_rule in ("dowg", "dowg_neutral")
    grad_sq_sum = state.grad_sq_sum + (distance**2 * sample.sq_norm if distance_weighted else sample.sq_norm)
    first_step = distance / torch.sqrt(sample.sq_norm)  # DoG's start: move exactly d, without momentum
    mu = sqrt_mu**2
    # (under asynchrony, the step the tuner asks for is cut for the gradients' delay; the distance measured next
    # is then the movement this cut step causes)
    staleness_scale = staleness_step_scale(state.staleness)
    if settings.step_rule != "secant":  # (the DoG family: no secant is measured, pass 1 left its sums out)
        # DoG's step as the effective step: the momentum spreads it as alpha = (1 - mu) d / sqrt(sum ||g||^2). An
        # absolute curvature is what SingleStep's alpha = (1 - sqrt mu)^2 / h_min needs and what gradients measure
        # worst (the secant is mostly the last gradient's own noise), so the scale comes from the distance travelled.
        numerator = distance**2 if distance_weighted else distance
        alpha = (1.0 - mu) * numerator / torch.sqrt(grad_sq_sum)
        alpha, least_step_per_step = cap_growth(
            alpha, mu, state, settings, numerator / torch.sqrt(grad_sq_sum) if settings.growth_cap else None)
        if settings.step_rule == "dowg_neutral":
            # A run whose distance grows as a random walk's (d_s^2 = s d_1^2: noise, not progress) leaves DoG's step
            # where it is, d_t / sqrt(t G), but raises DoWG's by sqrt(2), since sum_s d_s^2 = t d_t^2 / 2: nothing but
            # the gradients' growth checks that, and Adam's metric normalizes it away. Divided by sqrt(2), DoWG keeps
            # its weights and DoG's neutral fixed point (docs/algorithm.md §9). (A constant factor: the growth cap's
            # bound on eta_t / t, taken before it, is the same.)
            alpha = alpha * NEUTRAL_DOWG_FACTOR
        alpha = staleness_scale * torch.where(started, alpha, first_step)
        new_state = measured.replace(mu=torch.where(started, mu, 0.0), alpha=alpha, distance=distance,
                                     grad_sq_sum=grad_sq_sum, least_step_per_step=least_step_per_step,
                                     climb_avg=climb_avg)
        if settings.preconditioned:  # (no secant is measured there either)
            new_state = new_state.replace(metric_mean=sums.metric_sum / sums.numel)
        return new_state
    secant_avg, step_sq_avg, secant_curvature = measurements.measure_secant(
        state, sums, measured.grad_var, settings.beta
    )
    # The secant along the last step sees the stiffest directions: it is h_max, and h_min = h_max / kappa.
    measured_secant = secant_curvature > 0.0
    alpha_secant = torch.where(
        measured_secant, contraction * kappa / torch.where(measured_secant, secant_curvature, 1.0), float("inf")
    )
    # For a quadratic ||g|| = h d: h_min ~ sqrt(h_min proxy) / d.
    alpha_distance = contraction * distance / torch.sqrt(measured.h_min)
    alpha = torch.minimum(torch.minimum(alpha_secant, MAX_STEP_GROWTH * state.alpha), alpha_distance)
    alpha, least_step_per_step = cap_growth(alpha, mu, state, settings)
    return measured.replace(
        mu=torch.where(started, mu, 0.0), alpha=staleness_scale * torch.where(started, alpha, first_step),
        distance=distance, secant_num_avg=secant_avg, secant_den_avg=step_sq_avg, secant_curvature=secant_curvature,
        grad_sq_sum=grad_sq_sum, least_step_per_step=least_step_per_step, climb_avg=climb_avg,
    )


def cap_growth(alpha: Tensor, mu: Tensor, state: TunerState, settings: TunerSettings,
               effective_step: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(alpha, the bound's next value) with ``settings.growth_cap`` the effective step eta = alpha / (1 - mu) held to
    linear growth: from step m = 1 / (1 - beta) on (the tuner's memory full), eta_t <= t min_{m <= s < t} eta_s / s,
    with t counted from 1. Where the cap does not bind, alpha is returned as it came, to the last bit.
    ``effective_step``: eta as the rule computes it, where that is not alpha / (1 - mu) to the last bit.

    Why linear: a factor c on the neutral DoWG rule grows its step as t^((c^2 - 1) / (2 - c^2)) where the gradients
    are mostly noise, linearly at c^2 = 1.5 and without bound at DoWG's c^2 = 2 (docs/tuner.md §14.1); linear growth
    is what the bounded rules allow, imposed only where DoWG's own step outgrows it. Before the memory is full the
    step grows as the start needs (geometrically, from DoG's first move)."""
    if not settings.growth_cap:
        return alpha, state.least_step_per_step
    if effective_step is None:
        effective_step = alpha / (1.0 - mu)
    t = state.step + 1.0
    active = t >= round(1.0 / (1.0 - settings.beta))
    bounded = active & (state.least_step_per_step > 0.0)  # (0: no bound yet, the first step of the memory sets it)
    capped = torch.where(bounded, torch.minimum(effective_step, state.least_step_per_step * t), effective_step)
    least = torch.where(bounded, torch.minimum(state.least_step_per_step, capped / t), capped / t)
    alpha = torch.where(capped < effective_step, (1.0 - mu) * capped, alpha)
    return alpha, torch.where(active, least, state.least_step_per_step)


def staleness_step_scale(mean_staleness) -> Tensor:
    """The factor on the scale-free tuner's step when its gradients are ``mean_staleness`` updates old on average
    (docs/tuner.md §10, "Under staleness"): 1 / sqrt(1 + tau).

    A delay of tau updates shrinks the stable step of gradient descent by about 1 + tau (on a quadratic the bound
    eta h < 2 becomes eta h < 2 sin(pi / (4 tau + 2))). DoG's and DoWG's steps grow with the distance the run
    travels, so a factor c on the step also slows the growth of that distance, and the step they settle on ends
    near c^2 times the synchronous one (measured: c = 1/4 gave 1/16 of it): the square root of the delay's factor
    on the step gives about the delay's factor on what the run applies.
    """
    return torch.rsqrt(1.0 + _f64(mean_staleness))


def remember_step(state: TunerState, sums: Sums, momentum: Tensor, grad_scale: Tensor) -> TunerState:
    """What the next step's secant needs of this one (``measurements.measure_secant``): P = <g, lr v+> with
    v+ = momentum v + grad_scale g, and the weight of g's noise in the step, alpha lr grad_scale (lr as
    weighted by ||g||^2: the group's lr when all tensors share one)."""
    grad_dot_next_step = momentum * sums.grad_dot_step + grad_scale * sums.grad_sq_norm_lr
    mean_lr = sums.grad_sq_norm_lr / torch.where(sums.sq_norm > 0.0, sums.sq_norm, 1.0)
    return state.replace(
        prev_grad_dot_next_step=grad_dot_next_step, prev_step_noise_weight=state.alpha * grad_scale * mean_lr
    )


# --------------------------------------------------------------------------------- one step
class UpdateCoefficients(NamedTuple):
    """Scalars of the update pass, already gated so that a skipped step changes nothing (§4.6, §4.7)."""

    finite: Tensor  # False on a skipped step: the gradient is read as zeros
    avg_decay: Tensor  # gbar <- avg_decay gbar + avg_weight g  (1 and 0 on a skipped step)
    avg_weight: Tensor
    momentum: Tensor  # multiplies v (1 on a skipped step)
    grad_scale: Tensor  # multiplies g in v <- momentum v + grad_scale g (0 on a skipped step)
    step_size: Tensor  # alpha before the group's multiplier (0 on a skipped step)
    average_weight: Tensor  # xbar <- xbar + average_weight (x - xbar) after the update (0 on a skipped step)
    previous_momentum: Tensor  # the momentum applied at the step before (read by the primal-average form; 1 if skipped)
    decay_rate: Tensor  # decoupled weight decay shrinks by lr lambda decay_rate per step (0 on a skipped step)


class FormScalars(NamedTuple):
    """The scalars of the primal-average form's pass 2 (0-dim tensors; ``passes.update_primal_average_*``)."""

    fast_step: Tensor  # lr eta s: z's step along g
    param_step: Tensor  # k lr eta s: y's step along g
    lead_into_params: Tensor  # k - (1 - b): the part of w that enters y
    kept: Tensor  # 1 - c: what the average leaves of w
    decay_step: Tensor  # lr lambda decay_rate: z's step along y (0 without decoupled decay)
    into_params: Tensor  # k: the part of z's step that enters y


def primal_average_coefficients(c: UpdateCoefficients, lr: float | Tensor, decay: float = 0.0) -> FormScalars:
    """The scalars of the form's pass 2 from the tuner's coefficients, the group's ``lr`` and decoupled ``decay``."""
    momentum = torch.where(c.finite, c.momentum, 0.0)  # (a skipped step: no division by 1 - 1)
    effective_step = c.step_size * lr / (1.0 - momentum)
    fast_step = effective_step * c.grad_scale
    into_params = c.average_weight + (1.0 - c.momentum) * (1.0 - c.average_weight)
    return FormScalars(fast_step, into_params * fast_step, into_params - (1.0 - c.previous_momentum),
                       1.0 - c.average_weight, c.decay_rate * lr * decay, into_params)


def decay_rate(alpha: Tensor, momentum: Tensor, measured: TunerState, step: Tensor, numel: Tensor,
               settings: TunerSettings) -> Tensor:
    """The decoupled weight decay's shrink per step, per unit of lr lambda (docs/algorithm.md §4.6, §8), for the
    applied ``alpha`` and ``momentum`` of step ``step``, whose ||g||^2 the ``measured`` state's running mean holds.

    The scale-free tuner gives lambda AdamW's meaning, the shrink lr lambda times the update's size per coordinate,
    so that it does not depend on the loss scale: in Adam's metric the update is the effective step alpha / (1 - m)
    times a normalised gradient, so that step itself; in the plain metric it is the effective step times the
    gradient's RMS per coordinate, sqrt(E||g||^2 / n) (a step of loss-free units: scaling the loss by c scales the
    step by 1/c and the RMS by c). The reference shrinks by lr alpha lambda, in its own units, as it always has.
    """
    if not settings.scale_free:
        return alpha
    effective_step = alpha / (1.0 - momentum)
    if settings.preconditioned:
        return effective_step
    grad_sq_mean = measured.grad_sq_avg / measurements.debias_factor(step, settings.beta)
    return effective_step * torch.sqrt(grad_sq_mean / torch.clamp(numel, min=1.0))


# The iterate average's weights grow as t^AVERAGE_POWER (polynomial-decay averaging, Shamir & Zhang 2013): at
# step t it covers about the last t / (AVERAGE_POWER + 1) iterates, so it forgets the start without a horizon.
# 8 is DoG's published choice (Ivgi, Hinder, Carmon 2023), taken as it is, not tuned on our suite.
AVERAGE_POWER = 8.0


def average_weight(step) -> Tensor:
    """The weight of the iterate reached at 1-based step ``step`` in the polynomial average: (k + 1) / (t + k)
    with k = AVERAGE_POWER, which is 1 at the first step (the average starts at x_1) and about (k + 1) / t later."""
    return (AVERAGE_POWER + 1.0) / (_f64(step) + AVERAGE_POWER)


def gradient_gates(sq_norm) -> tuple[Tensor, Tensor]:
    """(finite, applied) for a scope whose ||g||^2 is ``sq_norm`` (§4.7).

    A non-finite gradient (only a NaN or Inf entry makes the float64 sum non-finite) is skipped:
    nothing changes but the skipped-step count. An all-zero gradient of the whole scope (a frozen
    phase, a masked loss) carries no information: like a step without gradients it is a no-op,
    not a skip, so it cannot age or pollute the estimates. Only ``applied`` steps change anything.
    """
    sq_norm = _f64(sq_norm)
    finite = torch.isfinite(sq_norm)
    return finite, finite & (sq_norm > 0.0)


def relative_clip_acts(settings: TunerSettings) -> bool:
    """Whether the scale-free tuner's relative clip of the update is on (it is off in Adam's metric by default)."""
    return settings.scale_free and math.isfinite(settings.relative_clip) and math.isfinite(settings.clip_trigger)


def relative_clip_mean_square(state: TunerState, settings: TunerSettings) -> Tensor:
    """The running mean of ||g||^2 over the steps before the next one (``state.step`` of them, debiased), which the
    relative clip measures a gradient against."""
    started = state.step >= 1.0
    return state.grad_sq_avg / torch.where(started, measurements.debias_factor(state.step - 1.0, settings.beta), 1.0)


def relative_clip_levels(grad_sq_mean, started, settings: TunerSettings, staleness=0.0) -> tuple[Tensor, Tensor]:
    """(trigger, level): the relative clip as absolute gradient norms. A gradient whose norm (after ``clip_norm``)
    exceeds ``trigger`` is applied with norm ``level``; the trigger is infinite before the first step (nothing seen
    yet). One place for the levels, so that a system whose workers apply the update themselves (Hogwild) clips as
    the tuner's own step would (``clipping_scales``)."""
    rms = torch.sqrt(_f64(grad_sq_mean))
    trigger = torch.where(_f64(staleness) > 0.0, settings.relative_clip, settings.clip_trigger)
    return torch.where(torch.as_tensor(started), trigger * rms, math.inf), settings.relative_clip * rms


def clipping_scales(sq_norm, h_max, started, settings: TunerSettings,
                    grad_sq_mean=None, staleness=0.0) -> tuple[Tensor, Tensor]:
    """(s, u): the factor on g for the statistics and the update (s), and the extra factor for the
    update alone (u), for a gradient with ||g||^2 = ``sq_norm`` (§4.1, §4.2, §4.5).

    ``h_max`` is the previous step's estimate and ``started`` whether there was one (t >= 1).
    s g has norm at most ``clip_norm`` and, with adaptive clipping, at most sqrt(100 h_max);
    s u g has norm at most sqrt(h_max). The scale-free tuner's relative clip bounds s u ||g|| by
    ``relative_clip`` sqrt(``grad_sq_mean``), the running mean of ||g||^2 over the steps before, where s ||g||
    exceeds ``clip_trigger`` times that root: in the update alone, so that the step's measurements see the gradient
    as it came and the step reacts to it. Under asynchrony (a reported mean ``staleness`` above 0) it acts at its own
    level, whatever the trigger: the step hears of a gradient's consequences tau updates late, and with the trigger
    at 10 the closed loop ended 2 to 20 times higher on the digits MLP (docs/tuner.md §10).
    """
    sq_norm, h_max, started = _f64(sq_norm), _f64(h_max), torch.as_tensor(started)
    norm = torch.sqrt(sq_norm)
    scale = torch.ones_like(norm)
    if settings.clip_norm is not None:
        scale = torch.where(norm > settings.clip_norm, settings.clip_norm / norm, 1.0)
    update_scale = torch.ones_like(norm)
    if relative_clip_acts(settings):
        trigger, level = relative_clip_levels(grad_sq_mean, started, settings, staleness)
        clipped = scale * norm > trigger
        cut = torch.minimum(level / torch.where(clipped, scale * norm, 1.0), torch.ones_like(norm))
        update_scale = torch.where(clipped, cut, 1.0)
    # (not for the scale-free tuner: its thresholds h_max are the reference's squared-gradient proxies)
    if settings.adaptive_clipping and not settings.scale_free:
        stat_threshold = torch.sqrt(100.0 * h_max)
        clipped = started & (scale * norm > stat_threshold)
        # s g gets norm stat_threshold, whatever clip_norm made of it before (not stat_threshold / s).
        scale = torch.where(clipped, stat_threshold / norm, scale)
        # Relative to the already scaled norm: s u ||g|| = sqrt(h_max).
        update_clipped = started & (scale**2 * sq_norm > h_max)
        update_scale = torch.where(update_clipped, torch.sqrt(h_max / (scale**2 * sq_norm)), 1.0)
    return scale, update_scale


def bound_first_step(update_scale, alpha, curvature_sample, started) -> Tensor:
    """The update factor u, bounded on the first step (t = 0) so that alpha_0 s u ||g|| <= 1 / (s ||g||).

    The first step has no curvature history to clip against, and alpha_0 is not tuned: a gradient of
    norm 1e20 would move the parameters by alpha_0 * 1e20 and training would never recover. Bound it
    by the tuner's own model of this one sample: the distance to the optimum is D = ||g|| / ||g||^2,
    the step that SingleStep tunes for it (alpha = 1 / ||g||^2, mu = 0), so alpha_0 ||g|| (scaled)
    may not exceed 1 / ||g||. Ordinary first steps are far below it. (Part of adaptive clipping.)
    """
    update_scale, started = _f64(update_scale), torch.as_tensor(started)
    first_reach = _f64(alpha) * _f64(curvature_sample)  # alpha_0 ||g|| / (1 / ||g||)
    return torch.where(~started & (first_reach > 1.0), 1.0 / first_reach, update_scale)


def applied_momentum(mu, offset, eps: float) -> Tensor:
    """m of §4.6: mu plus the external offset, kept inside (-1, 1) where heavy ball can converge."""
    return torch.clamp(_f64(mu) + _f64(offset), -1.0 + eps, 1.0 - eps)


def tune_step(state: TunerState, sums: Sums, settings: TunerSettings) -> tuple[TunerState, UpdateCoefficients]:
    """Everything between the two passes, on 0-dim float64 tensors: gate, clip, measure, tune.

    Returns the tuner's next state and the coefficients of the update pass, both already gated
    so that a non-finite gradient changes nothing but the skipped-step count (§4.7).
    """
    finite, applied = gradient_gates(sums.sq_norm)
    sq_norm = torch.where(finite, sums.sq_norm, 0.0)
    if settings.step_rule == "secant":  # (sum lr <g, v> is bounded by the roots of sum ||g||^2 and sum lr^2 ||v||^2)
        sums = sums._replace(grad_dot_step=measurements.within_cauchy_schwarz(
            sums.grad_dot_step, sums.sq_norm, sums.step_sq_norm))
    density = torch.ones_like(sq_norm)
    if settings.sparsity_correction:
        density = sums.nonzero / torch.clamp(sums.numel, min=1.0)

    # Clipping factors, from the previous step's curvature range.
    started = state.step >= 1.0
    grad_sq_mean = relative_clip_mean_square(state, settings) if settings.scale_free else None
    scale, update_scale = clipping_scales(sq_norm, state.h_max, started, settings, grad_sq_mean, state.staleness)
    curvature_sample = scale**2 * sq_norm

    # The norm of the gradient average after this step's update, before the update pass writes it.
    avg_decay = torch.where(applied, torch.full_like(sq_norm, settings.beta), 1.0)
    avg_weight = torch.where(applied, (1.0 - settings.beta) * scale, 0.0)
    grad_avg_sq_norm = measurements.averaged_sq_norm(
        sums.grad_avg_sq_norm, torch.where(finite, sums.cross, 0.0), sq_norm, avg_decay, avg_weight
    )

    sample = measurements.GradientSample(curvature_sample, grad_avg_sq_norm, density)
    measured, estimates = measurements.measure(state, sample, settings)
    if settings.scale_free:
        # (the factor on g in v: s, and u where the relative clip acts)
        new_state = tune_scale_free(state, measured, sums, sample, settings, grad_scale=scale * update_scale)
        mu, alpha = new_state.mu, new_state.alpha
    else:
        mu, alpha = tune(estimates, state.step, state.mu, state.alpha, settings)
        new_state = measured.replace(mu=mu, alpha=alpha)
    new_state = new_state.replace(step=state.step + 1.0)

    # The update uses this step's (reference) or the previous step's (paper) tuned values.
    applied_mu, applied_alpha = (state.mu, state.alpha) if settings.update_first else (mu, alpha)
    if settings.adaptive_clipping and not settings.scale_free:
        update_scale = bound_first_step(update_scale, applied_alpha, curvature_sample, started)
    momentum = torch.where(applied, applied_momentum(applied_mu, state.momentum_offset, settings.eps), 1.0)
    step_size = torch.where(applied, applied_alpha, 0.0)
    coefficients = UpdateCoefficients(
        finite=applied,
        avg_decay=avg_decay,
        avg_weight=avg_weight,
        momentum=momentum,
        grad_scale=torch.where(applied, scale * update_scale, 0.0),
        step_size=step_size,
        average_weight=torch.where(applied, average_weight(state.step + 1.0), 0.0),
        previous_momentum=torch.where(applied, state.last_momentum, 1.0),
        decay_rate=torch.where(
            applied, decay_rate(step_size, momentum, measured, state.step, sums.numel, settings), 0.0),
    )
    if settings.momentum_form == "primal_average":  # (the weight of the average in the parameters, for the next step)
        new_state = new_state.replace(last_momentum=coefficients.momentum)
    if settings.preconditioned and settings.momentum_form == "primal_average":
        # (the sum of z's step sizes with the average's decay, as w sums the steps: the next signal's weights)
        fast_step = primal_average_coefficients(coefficients, 1.0).fast_step
        new_state = new_state.replace(
            lead_step_sum=(1.0 - coefficients.average_weight) * (state.lead_step_sum + fast_step))
    elif settings.preconditioned:  # (the next step's signal reads this one's <g, v> through the momentum it applied)
        new_state = new_state.replace(
            carried_grad_dot_momentum=coefficients.momentum * new_state.carried_grad_dot_momentum)
    elif settings.step_rule == "secant":  # (what the next step's secant needs of this one)
        new_state = remember_step(new_state, sums, coefficients.momentum, coefficients.grad_scale)
    new_state = new_state.select(applied, state).replace(
        skipped_steps=state.skipped_steps + (~finite).to(torch.float64)
    )
    return new_state, coefficients


def _tune_step_of_vector(
    state: TunerState, sums: Tensor, settings: TunerSettings
) -> tuple[TunerState, UpdateCoefficients]:
    return tune_step(state, Sums.from_vector(sums), settings)


# One graph of a few hundred scalar operations instead of as many eager kernel launches (``fused=True``).
_compiled_tune_step_of_vector = torch.compile(_tune_step_of_vector)


def compiled_tune_step(state: TunerState, sums: Sums, settings: TunerSettings) -> tuple[TunerState, UpdateCoefficients]:
    """``tune_step`` compiled. The sums go in as their vector: dynamo makes every 0-dim float64 CPU input a symbolic
    float whose guard rejects NaN, so sums that are NaN (a NaN gradient, or in Adam's metric an infinite one) would
    recompile the step; the tuner's state never holds NaN (a skipped step keeps it), so it goes in as it is."""
    return _compiled_tune_step_of_vector(state, sums.vector(), settings)
