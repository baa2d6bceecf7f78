"""What the tuner remembers between steps, how it is configured, and how it is saved.

A tuner owns one ``TunerState`` per tuning scope (all parameter groups together by default,
or one per group). Every field is a float64 tensor on the parameters' device, so a step can
update the whole record without leaving the device, and a checkpoint is a plain dict of
tensors that ``torch.load(..., weights_only=True)`` accepts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields

import torch
from torch import Tensor


# The tuner YellowFin() runs: the scale-free one, which on five seeds is ahead of or level with grid-tuned momentum
# SGD on every task of the suite and ahead of the authors' reference on every one (docs/tuner.md §11). The
# reference stays available as YellowFin.reference_variant, and a checkpoint saved before the tuner option existed
# loads as the reference it ran.
DEFAULT_TUNER = "scale_free"


@dataclass(frozen=True)
class TunerSettings:
    """Settings shared by every parameter that one tuner measures."""

    beta: float | None = None  # None: the tuner's own memory, DEFAULT_BETA
    curvature_window: int = 20
    eps: float = 1e-6
    initial_lr: float = 1e-4  # alpha_0, the tuned step of the first step (the name is public)
    initial_momentum: float = 0.0
    adaptive_clipping: bool = True
    slow_start: bool = True
    clip_norm: float | None = None
    sparsity_correction: bool = False
    # The paper's variant (Algorithm 1) differs from the reference in these three:
    update_first: bool = False
    curvature_smoothing: str = "log"
    smooth_tuned: bool = False
    # "reference": the authors' tuner. "scale_free": every estimate in loss and parameter units, so that
    # the trajectory does not depend on the loss scale (docs/algorithm.md §8); it has no slow start, no
    # adaptive clipping, no alpha_0 and no mu_0, and its guards are relative.
    tuner: str = DEFAULT_TUNER
    # The scale-free tuner's step: "dog" (the effective step alpha / (1 - mu) is DoG's d / sqrt(sum ||g||^2)),
    # "dowg" (DoWG's d^2 / sqrt(sum d_t^2 ||g_t||^2), each gradient weighted by the squared distance reached when it
    # came), "dowg_neutral" (DoWG's divided by sqrt(2)) or "secant" (alpha from the secant curvature and the distance
    # step). None: the metric's default (DEFAULT_STEP_RULE: "dowg" in the plain metric, "dowg_neutral" in Adam's).
    step_rule: str | None = None
    # "adam": the scale-free tuner measures and steps in Adam's metric, the diagonal sqrt of a running average of
    # g^2 (docs/algorithm.md §9): one more buffer per parameter (that average), no gradient average, the signal
    # measured along the momentum. None: plain momentum SGD. Only with tuner="scale_free" and a step rule of
    # PRECONDITIONED_STEP_RULES.
    precondition: str | None = None
    # The scale-free tuner clips the gradient it applies at relative_clip times the root of the running mean of
    # ||g||^2 (the tuner's own memory, over the steps before; from the second step on): DoG's step is calibrated
    # on the gradients seen so far, and a gradient far above them (a regime change: the autoencoder's encoder
    # waking on its plateau) would meet that step at full size. Only the update is clipped: the measurements,
    # the step's sum among them, see the gradient as it came, so the step falls at once. A ratio of gradient
    # norms, so loss-scale free (in Adam's metric, of the metric's norms). math.inf: no clipping. None: the default
    # by metric and form (default_relative_clip).
    relative_clip: float | None = None
    # The relative clip acts only on a gradient above clip_trigger times that running RMS (and then cuts it to
    # relative_clip times it). None: by momentum form (default_clip_trigger). In primal-average form the clip's own
    # level: every gradient above it is cut. In heavy ball 1 / sqrt(1 - beta), so that it acts on a gradient whose
    # share of the running mean of ||g||^2, 1 - beta, would alone equal the whole mean: an outlier against the
    # tuner's memory (the autoencoder's escape from its plateau, 16 to 81 times the RMS), not the ordinary growth of
    # the gradient early in a run (the char-LSTM's, 3 to 4 times), which the clip cost heavy ball a lasting part of
    # its step (docs/tuner.md §10, §19).
    clip_trigger: float | None = None
    # The scale-free tuner's first move, DoG's r_eps: the distance d starts at initial_distance (1 + ||x_0||) (in
    # Adam's metric, carried into its units), a length relative to the parameters. It acts on the first step only
    # (afterwards d is the distance measured). None: the step rule's default (DEFAULT_INITIAL_DISTANCE).
    initial_distance: float | None = None
    # Hold the scale-free tuner's effective step alpha / (1 - mu) to growing at most in proportion to t once the
    # tuner's memory is full (from step 1 / (1 - beta) on, the least eta_s / s since then bounds eta_t / t): the
    # growth that a step rule bounded under noise allows. DoWG's step grows without bound where the gradients are
    # mostly noise and nothing else holds it (a run near interpolation). Off by default: on the suite it is level
    # with DoWG on five seeds, and on a separable problem it cut the one runaway's peak batch loss from 598 to 16
    # but that run ended higher (0.09 against 0.045; docs/tuner.md §15).
    growth_cap: bool = False
    # Hold the scale-free tuner's distance d where the loss rises along the way travelled: d = max ||x - x_0|| grows
    # only while the running mean, over the tuner's memory, of cos(g, x - x_0) is at most 0
    # (measurements.measure_climb). Moving uphill along its own line is the run leaving, not evidence of a solution
    # farther away; near interpolation DoWG's step grew with that distance until the run ran away (docs/tuner.md §16).
    # None: the step rule's default (DEFAULT_HOLD_DISTANCE_UPHILL).
    hold_distance_uphill: bool | None = None
    # Keep the iterates' polynomial average (weights growing as t^AVERAGE_POWER, tuning.average_weight) in one more
    # buffer per parameter; ``YellowFin.averaged()`` puts it in the parameters for evaluation. It changes nothing
    # in the trajectory: it is the point to hand out, which under gradient noise is much closer to the optimum. In
    # primal-average form the iterates are the points y where the gradients are taken, and their average is handed
    # out instead of the form's own average xbar, whose feedback through y shortens its window by 1 - mu
    # (docs/algorithm.md §11). None: default_average (in the plain metric's primal-average form only).
    average: bool | None = None
    # How the tuned (mu, alpha) move the parameters. "heavy_ball": v <- mu v + g, x <- x - alpha v. "primal_average":
    # the same pair in primal-averaging form (docs/algorithm.md §11): a plain-SGD sequence z moves by the effective
    # step alpha / (1 - mu), an average xbar of z follows it with the polynomial average's weights, and the
    # gradients are taken at y = (1 - mu) z + mu xbar. Heavy ball is this form with an average over the last
    # 1 / (1 - mu) steps; here the average covers the run, so the parameters (y) sit near it and YellowFin.averaged()
    # hands it out. The same buffers as heavy ball: the momentum buffer holds z - xbar (in Adam's metric z steps along
    # M^-1 g and the signal is read along z - xbar). DoG/DoWG rules, dense gradients, synchronous training only, for
    # now. None: default_momentum_form (the primal-average form wherever it runs, heavy ball elsewhere).
    momentum_form: str | None = None

    def __post_init__(self):
        _check(self.tuner in TUNERS, "tuner", self.tuner, " or ".join(map(repr, TUNERS)))
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.tuner])
        check_number("beta", self.beta, "a number in [0, 1)")  # (before the clip's trigger is derived from it)
        _check(0.0 <= self.beta < 1.0, "beta", self.beta, "[0, 1)")
        if self.step_rule is not None and not self.scale_free:
            raise ValueError(f"step_rule={self.step_rule!r} is an option of tuner='scale_free'; "
                             f"tuner={self.tuner!r} does not take it")
        if self.scale_free:
            if self.step_rule is None:  # (an unknown precondition is refused below)
                object.__setattr__(self, "step_rule", DEFAULT_STEP_RULE.get(self.precondition, "dog"))
            _check(self.step_rule in STEP_RULES, "step_rule", self.step_rule, " or ".join(map(repr, STEP_RULES)))
        if self.momentum_form is None:  # (before the clip's trigger and the average, whose defaults read it)
            object.__setattr__(self, "momentum_form", default_momentum_form(self))
        if self.average is None:
            object.__setattr__(self, "average", default_average(self.momentum_form, self.precondition))
        # The relative clip's level and trigger, in this order (the trigger's default reads the resolved level).
        for name, default in (
                ("relative_clip", lambda: default_relative_clip(self.precondition, self.momentum_form)),
                ("clip_trigger", lambda: default_clip_trigger(self.momentum_form, self.relative_clip, self.beta))):
            value = getattr(self, name)
            if value is not None:
                if not self.scale_free:
                    raise ValueError(f"{name}={value!r} is an option of tuner='scale_free' (the reference clips by "
                                     "its own adaptive_clipping)")
                check_number(name, value, "None or a number > 0 (math.inf: no clipping)")
                _check(value > 0.0, name, value, "None or a number > 0 (math.inf: no clipping)")
            elif self.scale_free:
                object.__setattr__(self, name, default())
        if self.initial_distance is not None:
            if not self.scale_free:
                raise ValueError(f"initial_distance={self.initial_distance!r} is an option of tuner='scale_free' "
                                 "(the reference starts from initial_lr)")
            check_number("initial_distance", self.initial_distance, "None or a finite number > 0")
            _check(0.0 < self.initial_distance < math.inf, "initial_distance", self.initial_distance,
                   "None or a finite number > 0")
        elif self.scale_free:
            object.__setattr__(self, "initial_distance", DEFAULT_INITIAL_DISTANCE[self.step_rule])
        check_bool("growth_cap", self.growth_cap)
        if self.growth_cap and not self.scale_free:
            raise ValueError("growth_cap=True is an option of tuner='scale_free' (the reference grows its step by its "
                             "slow start)")
        if self.hold_distance_uphill is not None:
            if not self.scale_free:
                raise ValueError(f"hold_distance_uphill={self.hold_distance_uphill!r} is an option of "
                                 "tuner='scale_free' (the reference measures no distance travelled)")
            check_bool("hold_distance_uphill", self.hold_distance_uphill)
        elif self.scale_free:
            object.__setattr__(self, "hold_distance_uphill", DEFAULT_HOLD_DISTANCE_UPHILL[self.step_rule])
        if self.precondition is not None:
            _check(self.precondition in PRECONDITIONERS, "precondition", self.precondition,
                   "None or " + " or ".join(map(repr, PRECONDITIONERS)))
            if not self.scale_free or self.step_rule not in PRECONDITIONED_STEP_RULES:
                raise ValueError(f"precondition={self.precondition!r} is an option of tuner='scale_free' with "
                                 f"step_rule='dog' or 'dowg_neutral'; got tuner={self.tuner!r}, "
                                 f"step_rule={self.step_rule!r}")
        for name, allowed in (("eps", "(0, 1)"), ("initial_lr", "[0, inf)"), ("initial_momentum", "(-1, 1)")):
            check_number(name, getattr(self, name), f"a number in {allowed}")
        check_number("curvature_window", self.curvature_window, "an integer in [1, 10**6]")
        _check(
            isinstance(self.curvature_window, numbers.Integral) and 1 <= self.curvature_window <= MAX_CURVATURE_WINDOW,
            "curvature_window", self.curvature_window, "an integer in [1, 10**6]",
        )
        _check(0.0 < self.eps < 1.0, "eps", self.eps, "(0, 1)")
        _check(self.initial_lr >= 0.0 and math.isfinite(self.initial_lr), "initial_lr", self.initial_lr, "[0, inf)")
        _check(-1.0 < self.initial_momentum < 1.0, "initial_momentum", self.initial_momentum, "(-1, 1)")
        if self.clip_norm is not None:
            check_number("clip_norm", self.clip_norm, "None or a finite number > 0")
        _check(
            self.clip_norm is None or (self.clip_norm > 0.0 and math.isfinite(self.clip_norm)),
            "clip_norm", self.clip_norm, "None or a finite number > 0",
        )
        _check(
            self.curvature_smoothing in ("log", "linear"),
            "curvature_smoothing", self.curvature_smoothing, "'log' or 'linear'",
        )
        for name in ("adaptive_clipping", "slow_start", "sparsity_correction", "update_first", "smooth_tuned",
                     "average"):
            check_bool(name, getattr(self, name))
        _check(self.momentum_form in MOMENTUM_FORMS, "momentum_form", self.momentum_form,
               " or ".join(map(repr, MOMENTUM_FORMS)))
        if self.momentum_form == "primal_average":
            if not self.scale_free or self.step_rule not in PRIMAL_AVERAGE_STEP_RULES:
                raise ValueError("momentum_form='primal_average' is an option of tuner='scale_free' with step_rule "
                                 f"'dog', 'dowg' or 'dowg_neutral'; got tuner={self.tuner!r}, "
                                 f"step_rule={self.step_rule!r}")
        if self.scale_free:
            # These name variants of the reference's own decisions, which the scale-free tuner does not make.
            for name, reference_only in (("update_first", True), ("smooth_tuned", True),
                                         ("curvature_smoothing", "linear")):
                if getattr(self, name) == reference_only:
                    raise ValueError(f"{name}={reference_only!r} is an option of tuner='reference'; "
                                     f"tuner='scale_free' does not take it")

    @property
    def scale_free(self) -> bool:
        return self.tuner == "scale_free"

    @property
    def preconditioned(self) -> bool:
        return self.precondition is not None

    @property
    def measurement_eps(self) -> float:
        """The guard inside the estimators: ``eps`` for the reference; for the scale-free tuner one far
        below any measured scale (an absolute eps would be a loss scale of its own)."""
        return SCALE_FREE_EPS if self.scale_free else self.eps

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# The curvature window is a float64 ring buffer per tuner, scanned for its extremes at every step:
# 10**6 samples (8 MB, a window longer than most training runs) is far beyond any useful window
# (the default is 20), while 10**9 would allocate 8 GB and scan it at every step.
MAX_CURVATURE_WINDOW = 10**6
TUNERS = ("reference", "scale_free")
# Each tuner's memory when ``beta`` is not given: the reference's ~1000 steps; ~100 steps for the scale-free
# tuner, chosen once on the suite: better at full budgets on the quadratic, logistic regression and the digits
# MLP, worse on the autoencoder, level on the ResNet-8 (docs/tuner.md §6), and on 4 of 5 tasks in the screen (§5).
DEFAULT_BETA = {"reference": 0.999, "scale_free": 0.99}
# The scale-free tuner's step rules (TunerSettings.step_rule), and each metric's default. In the plain metric "dowg":
# at full budgets ahead of "dog" on five of seven tasks and level on two, stable near interpolation like it, where
# "secant" diverges (docs/tuner.md §8.1, §10). In Adam's metric "dowg_neutral" (DoWG's step divided by sqrt(2),
# tuning.tune_scale_free): DoWG itself diverged there, because the preconditioner normalizes away the gradient growth
# that holds its step in check (§10), and the neutral rule needs no such check; at full budgets it is ahead of "dog"
# on five of seven tasks and behind by about 1% on two (§12). "dog" stays available there.
# A parameter group stores the rule it resolved (YellowFin.add_param_group), so that a checkpoint keeps its rule
# when a default changes.
STEP_RULES = ("dog", "dowg", "dowg_neutral", "secant")
PRECONDITIONED_STEP_RULES = ("dog", "dowg_neutral")
DEFAULT_STEP_RULE = {None: "dowg", "adam": "dowg_neutral"}
# The scale-free tuner's relative clip (TunerSettings.relative_clip) when none is given. 2 in the plain metric, the one
# value screened for the cut: the autoencoder's escape from its plateau cut to twice the RMS turned 2 of 3 seeds stuck
# into 3 of 3 ahead of tuned momentum SGD, and cut to ten times it one seed fell back (docs/tuner.md §10). It acts above
# its trigger (TunerSettings.clip_trigger, by default default_clip_trigger). In Adam's metric the same 2 in
# primal-average form, where it took the autoencoder to tuned Adam's best (docs/tuner.md §21), and none in heavy ball,
# where it cost both ResNets and left the autoencoder where it was (§11, the closed leads).
DEFAULT_RELATIVE_CLIP = 2.0


def default_relative_clip(precondition: str | None, momentum_form: str) -> float:
    """TunerSettings.relative_clip when none is given: DEFAULT_RELATIVE_CLIP, but none in Adam's metric's heavy ball."""
    return math.inf if precondition is not None and momentum_form == "heavy_ball" else DEFAULT_RELATIVE_CLIP
# The scale-free tuner's first move (TunerSettings.initial_distance) when none is given, by step rule: DoG's r_eps,
# as a fraction of (1 + ||x_0||). The step grows geometrically from it and the rule's annealing takes every start to
# the same late level, so the start sets the first tens of steps; it must stay below the distance a run travels.
# DoG's own 1e-6 cost the DoG rule ~80 of a 300-step ResNet budget before the loss moved; 1e-3 was better on every
# network screened (docs/tuner.md §7.1, §8.2). The neutral DoWG rule (Adam's metric's default) starts at 1e-2: at
# full budgets, 3 seeds, ahead of 1e-3 or level on every task (the autoencoder reaches tuned Adam with it), with 3e-2
# worse than 1e-2 on three tasks of seven (docs/tuner.md §14), a grid of three chosen once on the suite. DoWG (the
# plain metric's default) keeps 1e-3: 1e-2 gained four tasks there at 3 seeds but only the ResNet-20 at five, and its
# runs on a separable problem ran away on 3 seeds of 20 against 1 of 20 (benchmarks/interpolation.py). The secant
# rule keeps the 1e-6 it was measured with.
DEFAULT_INITIAL_DISTANCE = {"dog": 1e-3, "dowg": 1e-3, "dowg_neutral": 1e-2, "secant": 1e-6}
# ... and the first move each rule ran with before the option existed: what a checkpoint saved then resumes with, and
# what the bench variants measured then keep.
INITIAL_DISTANCE_BEFORE_THE_OPTION = {"dog": 1e-3, "dowg": 1e-3, "dowg_neutral": 1e-3, "secant": 1e-6}
# Whether the scale-free tuner holds its distance where the run climbs (TunerSettings.hold_distance_uphill) when
# none is given, by step rule. On for DoWG, the plain metric's default: its step grows with the distance without
# bound where nothing else holds it, and with the hold (docs/tuner.md §16; five seeds, full budgets) the separable
# problem's runaway no longer happens, the char-LSTM and the ResNet-20 end lower on every seed (by 0.044 and 0.015),
# the noisy quadratic's average higher (by 0.004, every seed; still 25 times below tuned momentum SGD), the rest
# level. Off for the neutral DoWG rule, Adam's metric's default, whose step holds its level under noise: there the
# hold cost the autoencoder its reach of tuned Adam (+0.003 over five seeds) for the char-LSTM's gain; off for DoG's
# and the secant rule, not measured with it.
DEFAULT_HOLD_DISTANCE_UPHILL = {"dog": False, "dowg": True, "dowg_neutral": False, "secant": False}
SCALE_FREE_EPS = 1e-30
# Why the secant rule cannot run on stale gradients (refused by the asynchronous systems and by set_staleness).
SECANT_UNDER_STALENESS = ("step_rule='secant' cannot run under asynchrony, on stale gradients: its secant pairs "
                          "each gradient with the last step, which a gradient computed tau versions ago breaks; use "
                          "the default step rule")
# Why the primal-average form is refused under asynchrony (by the asynchronous systems and by set_staleness).
PRIMAL_AVERAGE_UNDER_STALENESS = ("momentum_form='primal_average' runs in synchronous training only: the staleness "
                                  "cut, the closed loop on the momentum and Hogwild's workers are heavy ball's; use "
                                  "momentum_form='heavy_ball'")
# TunerSettings.momentum_form: heavy ball, and the same tuned pair in primal-averaging form (docs/algorithm.md §11).
MOMENTUM_FORMS = ("heavy_ball", "primal_average")
# The step rules the primal-average form runs with (the secant pairs each gradient with the last heavy-ball step).
PRIMAL_AVERAGE_STEP_RULES = ("dog", "dowg", "dowg_neutral")


def default_momentum_form(settings: "TunerSettings") -> str:
    """TunerSettings.momentum_form when none is given: the primal-average form wherever it runs (the scale-free tuner
    with a DoG or DoWG rule, in either metric), heavy ball elsewhere. With the clip acting
    on every gradient above its level, the form ended below tuned momentum SGD on every seed of every task of the
    suite, and below heavy ball on every seed of four tasks, where heavy ball with that clip lost two (docs/tuner.md
    §19); in Adam's metric it reached tuned Adam on every task and gained on five (§21), with decoupled weight decay
    too (§22), and in the plain metric with decoupled decay in AdamW's units ahead of heavy ball with it on the mean
    of all seven tasks (§23.2). Where it does not run (asynchrony, sparse gradients) heavy ball takes its place
    (``YellowFin.choose_heavy_ball``)."""
    runs = settings.scale_free and settings.step_rule in PRIMAL_AVERAGE_STEP_RULES
    return "primal_average" if runs else "heavy_ball"


def default_average(momentum_form: str, precondition: str | None) -> bool:
    """TunerSettings.average when none is given: kept in the plain metric's primal-average form, whose own average xbar
    is pulled back through the gradient points y with a gain 1 / (1 - mu), so that it averages over a window 1 - mu
    times the polynomial average's (on the noisy quadratic its excess loss was 3.8 times the average of the y's over
    five seeds, and higher on every seed; docs/tuner.md §24). Not in Adam's metric, whose state is held to three
    buffers per parameter (as many as Adam's plus one: P, the form's buffer, x_0), nor in heavy ball, whose iterate is
    its gradient point; average=True keeps it there too."""
    return momentum_form == "primal_average" and precondition is None


def default_clip_trigger(momentum_form: str, relative_clip: float, beta: float) -> float:
    """TunerSettings.clip_trigger when none is given: none where the clip is off; in primal-average form the clip's
    own level (the form's average lags the iterate, and an unclipped gradient returning on a plateau saturated the
    autoencoder's encoder on 3 of 20 seeds, none with the cut; docs/tuner.md §19); in heavy ball outlier_trigger."""
    if not math.isfinite(relative_clip):
        return math.inf
    return relative_clip if momentum_form == "primal_average" else outlier_trigger(beta)
# TunerSettings.precondition: the metrics the scale-free tuner can measure and step in besides the plain one.
PRECONDITIONERS = ("adam",)


def outlier_trigger(beta: float) -> float:
    """The relative clip's trigger by default (TunerSettings.clip_trigger): 1 / sqrt(1 - beta) times the running RMS,
    where a gradient's share of the running mean of ||g||^2, (1 - beta) ||g||^2, alone equals the whole mean."""
    return 1.0 / math.sqrt(1.0 - beta)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: allowed range is {allowed}")


def check_number(name: str, value, allowed: str = "a real number") -> None:
    """A TypeError unless ``value`` is a real number (int or float; a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"invalid {name}={value!r} of type {type(value).__name__}: allowed is {allowed}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"invalid {name}={value!r} of type {type(value).__name__}: allowed values are True or False")


@dataclass(frozen=True)
class TunerState:
    """One tuner's memory. Averages are raw exponential moving averages (debiased when read)."""

    step: Tensor  # t: completed (non-skipped) steps
    skipped_steps: Tensor  # steps whose gradient held NaN or Inf
    curvatures: Tensor  # ring buffer of the last `curvature_window` samples ||g||^2
    h_max_avg: Tensor  # average of log(h_max + eps), or of h_max with linear smoothing
    h_min_avg: Tensor
    grad_sq_avg: Tensor  # average of ||g||^2
    grad_norm_avg: Tensor  # average of ||g||
    dist_avg: Tensor  # average of the distance samples
    density_avg: Tensor  # average fraction of non-zero gradient entries (sparsity correction)
    # The latest estimates; h_max doubles as the clipping threshold of the next step.
    h_min: Tensor
    h_max: Tensor
    grad_var: Tensor
    dist: Tensor
    # Tuned values: those the next (update-first) or the last (reference order) update used.
    mu: Tensor
    alpha: Tensor  # the tuned step size, before a group's ``lr`` multiplier (saved as ``lr`` by version 0.1)
    # Additive correction to mu, driven from outside (the asynchronous closed loop).
    momentum_offset: Tensor
    # The mean staleness of the gradients applied so far, reported from outside (an asynchronous system); the
    # scale-free tuner's step is divided by sqrt(1 + it) (tuning.staleness_step_scale), the reference ignores it.
    staleness: Tensor
    # The scale-free tuner's own memory (zeros, unused, for the reference; docs/algorithm.md §8):
    distance: Tensor  # d = max_t ||x_t - x_0||, from 1e-6 (1 + ||x_0||) (DoG)
    secant_num_avg: Tensor  # average of s = <g - g_prev, x - x_prev> + the noise correction
    secant_den_avg: Tensor  # average of q = ||x - x_prev||^2
    secant_curvature: Tensor  # s_avg / q_avg, the curvature along the steps (0 until measured)
    prev_grad_dot_next_step: Tensor  # <g_prev, lr v>, the last gradient along the step it led to
    prev_step_noise_weight: Tensor  # alpha_prev lr grad_scale_prev: -E<noise_prev, x - x_prev> / C
    grad_sq_sum: Tensor  # sum_t ||g_t||^2 over the applied steps, DoG's denominator ("dowg": sum_t d_t^2 ||g_t||^2)
    # The preconditioned tuner's signal, read from the momentum buffer v (it keeps no gradient average):
    signal_avg: Tensor  # the running mean of <g_t, g_(t-1)>, an estimate of ||E g||^2 (debiased as it is kept)
    carried_grad_dot_momentum: Tensor  # m_(t-1) <g_(t-1), v_(t-2)>, what <g_t, v_(t-1)> holds besides <g_t, g_(t-1)>
    metric_mean: Tensor  # the mean of the metric over the scope at the last step (its eps is relative to it)
    # The growth cap's bound (TunerSettings.growth_cap): the least effective step per step, eta_s / s, since the
    # tuner's memory filled; 0 before.
    least_step_per_step: Tensor
    # The running mean of cos(g, x - x_0) over the tuner's memory (measurements.measure_climb): above 0, the loss rises
    # along the way travelled (TunerSettings.hold_distance_uphill then holds the distance). Kept by every scale-free
    # tuner, read only with the option.
    climb_avg: Tensor
    # The primal-average form's momentum applied at its last applied step (0 before the first; heavy ball keeps 0): the
    # weight b of the average in the parameters, y = (1 - b) z + b xbar, which the next step needs to find z again.
    last_momentum: Tensor
    # The primal-average form in Adam's metric: the sizes of z's steps summed with the average's decay, as its lead
    # w = z - xbar sums the steps (measurements.measure_signal_along_lead); 0 elsewhere.
    lead_step_sum: Tensor

    @classmethod
    def initial(cls, settings: TunerSettings, device: torch.device | str | None = None) -> "TunerState":
        def scalar(value: float = 0.0) -> Tensor:
            return torch.tensor(value, dtype=torch.float64, device=device)

        values = {f.name: scalar() for f in fields(cls)}
        values["curvatures"] = torch.zeros(settings.curvature_window, dtype=torch.float64, device=device)
        values["mu"] = scalar(settings.initial_momentum)
        values["alpha"] = scalar(settings.initial_lr)
        return cls(**values)

    def replace(self, **changes: Tensor) -> "TunerState":
        return dataclasses.replace(self, **changes)

    def select(self, keep_new: Tensor, old: "TunerState") -> "TunerState":
        """Field by field: self where keep_new is true, else old (no host synchronisation)."""
        return TunerState(**{
            f.name: torch.where(keep_new, getattr(self, f.name), getattr(old, f.name)) for f in fields(self)
        })

    @property
    def device(self) -> torch.device:
        return self.step.device

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict, settings: TunerSettings, device=None) -> "TunerState":
        """Rebuild a state from ``as_dict`` output, refusing anything that does not fit.

        A checkpoint written before the tuned step was named ``alpha`` holds it as ``lr``, and one written
        before the scale-free tuner lacks its fields (a reference tuner's, which never reads them), or some of
        them (a scale-free tuner's from before ``grad_sq_sum``, which then restarts DoG's sum), and one written
        before ``staleness`` was synchronous (staleness 0), and one written before ``least_step_per_step`` had no
        growth cap, and one written before ``climb_avg`` starts its running mean anew, and one written before
        ``last_momentum`` (or ``lead_step_sum``) ran heavy ball, which does not read it: all load.
        """
        expected = {f.name for f in fields(cls)}
        if isinstance(values, dict) and "lr" in values and "alpha" not in values:
            values = {("alpha" if name == "lr" else name): value for name, value in values.items()}
        if isinstance(values, dict) and not set(SCALE_FREE_FIELDS) <= set(values):
            initial = cls.initial(settings)
            values = {**{name: getattr(initial, name) for name in SCALE_FREE_FIELDS}, **values}
        # (saved before the field: synchronous, no bound yet, no cosine seen yet)
        for name in ("staleness", "least_step_per_step", "climb_avg", "last_momentum", "lead_step_sum"):
            if isinstance(values, dict) and name not in values:
                values = {**values, name: getattr(cls.initial(settings), name)}
        if not isinstance(values, dict) or set(values) != expected:
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"tuner state must have exactly the fields {sorted(expected)}, got {got}")
        for name, value in values.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"tuner state field {name!r} must be a tensor, got {type(value).__name__}")
            shape = (settings.curvature_window,) if name == "curvatures" else ()
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"tuner state field {name!r} has shape {tuple(value.shape)}, expected {shape} "
                    f"(curvature_window={settings.curvature_window})"
                )
        for name, value in values.items():
            if value.is_complex() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"tuner state field {name!r} holds {value.tolist()}: allowed are finite real numbers")
            low, high = _FIELD_RANGES.get(name, (-math.inf, math.inf))
            if not bool(((value >= low) & (value <= high)).all()):
                raise ValueError(f"tuner state field {name!r} holds {value.tolist()}: allowed range is [{low}, {high}]")
        for name in ("step", "skipped_steps"):
            if values[name] != torch.round(values[name]):
                raise ValueError(f"tuner state field {name!r} holds {values[name].item()}: allowed are whole numbers")
        return cls(**{
            name: value.detach().to(device=device, dtype=torch.float64).clone() for name, value in values.items()
        })


# The fields added with the scale-free tuner (absent from older checkpoints).
SCALE_FREE_FIELDS = ("distance", "secant_num_avg", "secant_den_avg", "secant_curvature", "prev_grad_dot_next_step",
                     "prev_step_noise_weight", "grad_sq_sum", "signal_avg", "carried_grad_dot_momentum", "metric_mean")

# What a saved tuner field may hold (finite in every case); fields not listed may take any finite value
# (the log-smoothed curvature averages are negative below 1; the momentum offset is clamped when used).
_FIELD_RANGES = {
    name: (0.0, math.inf)
    for name in ("step", "skipped_steps", "curvatures", "grad_sq_avg", "grad_norm_avg", "dist_avg",
                 "h_min", "h_max", "grad_var", "dist", "alpha", "distance", "secant_den_avg", "secant_curvature",
                 "prev_step_noise_weight", "grad_sq_sum", "metric_mean", "staleness", "least_step_per_step",
                 "lead_step_sum")
} | {"density_avg": (0.0, 1.0), "mu": (-1.0, 1.0), "climb_avg": (-1.0, 1.0), "last_momentum": (-1.0, 1.0)}
