"""Screening of candidate tuner changes (issue 12): each change alone and all together, on real tasks.

A research harness, not the library's optimizer: ``FlatTuner`` walks one flat float64 copy of the parameters
(slow, obviously correct) and runs the library's own tuning step (``yellowfin.tuning.tune_step``), so with no
change switched on it is the reference algorithm. Each switch replaces one decision of the reference by a
unit-consistent one (docs/tuner.md explains why):

- ``alpha_units="distance"``: alpha in parameter units. The reference's curvature proxy h = ||g||^2 scales as
  c^2 when the loss is multiplied by c, so alpha = (1 - sqrt mu)^2 / h_min scales as 1/c^2. For a quadratic,
  ||g|| = h d with d the distance to the optimum, so h = sqrt(h_proxy) / d; d is estimated as DoG's
  max_t ||x_t - x_0|| (started at 1e-6 (1 + ||x_0||)), which replaces both alpha_0 and the slow start.
- ``momentum_rule="snr"``: SingleStep's p = D^2 h_min^2 / (2 C) rewritten with unit-consistent estimates. With
  h = ||grad f|| / d and D = d, p = ||grad f||^2 / (2 C): the gradient's signal-to-noise ratio, measured as the
  debiased ||gbar||^2 over the variance estimate C.
- ``kappa="norm"``: the condition number as the ratio of gradient norms in the window (for a quadratic,
  ||g|| ranges over [h_min d, h_max d]), not of squared norms, which gives kappa^2.
- ``alpha_units="secant"``: alpha from a secant curvature, <g - g_ref, x - x_ref> / ||x - x_ref||^2, anchored at
  the iterates' running average (``anchor="average"``) or at the previous step (``anchor="previous"``, with
  the previous gradient's own noise alpha C removed unless ``noise_correction=False``; with
  ``noise_correction="relative"`` the noise is the measured noise fraction C / E||g||^2 times the previous
  gradient's own ||g_prev||^2, so that it shrinks with the gradients it accompanies), or along the step before
  (``anchor="lagged"``: <g_t - g_(t-1), x_(t-1) - x_(t-2)> / <x_t - x_(t-1), x_(t-1) - x_(t-2)>, whose numerator
  holds no noise of g_(t-1) or g_t, so no correction is needed); read as h_min
  (``secant_is="min"``), as h_max with h_min = h_max / kappa (``"max"``), or at the robust region's upper end
  (``"upper"``). The step grows at most ``max_growth`` times per step.
- ``alpha_units="distance_secant"``: the smaller of the distance step and the secant step (the library's
  ``tuner="scale_free"`` is the variant ``distance_secant`` at memory 0.99, ``ds_memory_0.99``).
- ``momentum_rule="along_momentum"``: signal and noise as running averages of scalars along the momentum,
  ||grad f||^2 ~ <g, v> / W (W the total weight of the past gradients in v), instead of a vector average.
- ``alpha_units="dog"``: the effective step alpha / (1 - mu) is DoG's d / sqrt(sum_t ||g_t||^2) (d the largest
  distance from x_0), mu from the momentum rule (``without_momentum=True``: mu = 0, the control, plain SGD on
  that step); ``dog_cap=True`` bounds the ``distance_secant`` step by it.
- ``memory``: the estimators' beta.

``AdamMetricTuner`` runs the ``distance_secant`` rule in Adam's metric (issue 13's first screen; docs/tuner.md §7),
or with ``step="dog"`` the ``snr_dog`` rule there (``without_momentum=True``: its control).

- ``dog_weights="anchor_<schedule>"``: DoG's rule measured about a moving anchor, a running average of the
  iterates, instead of x_0 (docs/tuner.md §13): neutral under noise, it anneals where the run is confined.
- ``monotone=True`` (Adam's metric): the effective step never falls below its largest value so far.

    python benchmarks/tuner_screen.py --tasks quadratic --variants distance_secant --seeds 0 1 2
    python benchmarks/tuner_screen.py --table       # rewrite screen.md from every results file present

Writes benchmarks/results-tuner-screen/<task>/<variant>_seed<k>.json (resumable: finished runs are skipped).
A screen on short budgets and two seeds: a lead, not a claim.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from yellowfin import YellowFin, measurements, tuning
from yellowfin.bench import metrics
from yellowfin.bench.results import finite_or_none, write_result
from yellowfin.bench.tasks import get_task
from yellowfin.measurements import Sums
from yellowfin.state import TunerSettings, TunerState

OUT = Path(__file__).resolve().parent / "results-tuner-screen"

VARIANTS: dict[str, dict] = {
    "flat_reference": {},
    "alpha_distance": dict(alpha_units="distance"),
    "snr": dict(momentum_rule="snr"),
    "kappa_norm": dict(kappa="norm"),
    "all_three": dict(alpha_units="distance", momentum_rule="snr", kappa="norm"),
    "secant": dict(alpha_units="secant"),
    "secant_snr": dict(alpha_units="secant", momentum_rule="snr"),
    "secant_snr_kappa": dict(alpha_units="secant", momentum_rule="snr", kappa="norm"),
    "step_secant_snr": dict(alpha_units="secant", momentum_rule="snr", anchor="previous"),
    "step_secant_snr_fast": dict(alpha_units="secant", momentum_rule="snr", anchor="previous", curvature_memory=0.9),
    "step_secant_fast": dict(alpha_units="secant", anchor="previous", curvature_memory=0.9),
    "step_secant": dict(alpha_units="secant", anchor="previous"),
    "distance_secant": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                            secant_is="max"),
    # distance_secant with one of its parts taken back, each alone:
    "ds_no_noise_correction": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm",
                                   anchor="previous", secant_is="max", noise_correction=False),
    "ds_reference_momentum": dict(alpha_units="distance_secant", kappa="norm", anchor="previous", secant_is="max"),
    "ds_squared_kappa": dict(alpha_units="distance_secant", momentum_rule="snr", anchor="previous", secant_is="max"),
    "ds_memory_0.99": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                           secant_is="max", memory=0.99),
    "dsm": dict(alpha_units="distance_secant", momentum_rule="along_momentum", kappa="norm", anchor="previous",
                secant_is="max"),
    "dsm_memory_0.99": dict(alpha_units="distance_secant", momentum_rule="along_momentum", kappa="norm",
                            anchor="previous", secant_is="max", memory=0.99),
    "dsu_memory_0.99": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                            secant_is="upper", memory=0.99),
    "ds_secant_range": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                            secant_is="range", memory=0.99),
    "ds_relative_noise": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                              secant_is="max", memory=0.99, noise_correction="relative"),
    "ds_lagged_secant": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="lagged",
                             secant_is="max", memory=0.99),
    "ds_edge_guard": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                          secant_is="max", memory=0.99, edge_guard=True),
    "ds_dog_cap": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                       secant_is="max", memory=0.99, dog_cap=True),
    "snr_dog": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99),
    # the same with DoG's start at 1e-3 (1 + ||x_0||), as the preconditioned tuner's (docs/tuner.md §7.1)
    "snr_dog_start_1e-3": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, start_distance=1e-3),
    # DoWG's distance-weighted sum in place of DoG's (docs/tuner.md §10)
    "snr_dowg_start_1e-3": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, start_distance=1e-3,
                                dog_weights="distance"),
    # the same with DoG's first move ten times larger (docs/tuner.md §13: a lead from Adam's metric)
    "snr_dowg_start_1e-2": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, start_distance=1e-2,
                                dog_weights="distance"),
    # the sum of ||g||^2 as t times its recent (polynomial, t^8) average (docs/tuner.md §10)
    "snr_dowg": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, dog_weights="distance"),
    "snr_dog_mu_floor_0.9": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                 start_distance=1e-3, momentum_floor=0.9),
    # diagnostics of the autoencoder's plateau (docs/tuner.md §10): DoWG with its effective step capped at tuned
    # momentum SGD's there (10, an oracle), or growing at most 5% a step
    "snr_dowg_cap_10": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, start_distance=1e-3,
                            dog_weights="distance", max_effective_step=10.0),
    "snr_dowg_growth_1.05": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                 start_distance=1e-3, dog_weights="distance", step_growth=1.05),
    "snr_dowg_clip_2": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, start_distance=1e-3,
                            dog_weights="distance", relative_clip=2.0),
    "snr_dog_clip_2": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, start_distance=1e-3,
                           relative_clip=2.0),
    # the clip on the update alone: the step's measurements see every gradient as it came
    "snr_dowg_update_clip_2": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                   start_distance=1e-3, dog_weights="distance", relative_clip=2.0,
                                   clip_update_only=True),
    "snr_dowg_update_clip_3": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                   start_distance=1e-3, dog_weights="distance", relative_clip=3.0,
                                   clip_update_only=True),
    # the clip triggered by an outlier against the memory (a gradient whose square alone would double the running
    # mean, K^2 = 1 / (1 - 0.99)), which it cuts to twice the RMS as before
    "snr_dowg_update_clip_2_trigger_10": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                              start_distance=1e-3, dog_weights="distance", relative_clip=2.0,
                                              clip_update_only=True, clip_trigger=10.0),
    # ... and its effective step held to growing at most as t from step 100 on (1 / (1 - memory)), where DoWG's
    # own step outgrows that (docs/tuner.md §14.1: DoWG's runaway near interpolation)
    "snr_dowg_update_clip_2_trigger_10_linear_100": dict(alpha_units="dog", momentum_rule="snr", kappa="norm",
                                                         memory=0.99, start_distance=1e-3, dog_weights="distance",
                                                         relative_clip=2.0, clip_update_only=True, clip_trigger=10.0,
                                                         linear_growth_after=100),
    # ... and its distance held wherever the run climbs along it (distance_needs_descent): the running mean of
    # cos(g, x - x0) above 0 says the loss rises along the way travelled, so the growth of ||x - x0|| is the run
    # leaving, not evidence that the solution lies farther (docs/tuner.md §16)
    "snr_dowg_update_clip_2_trigger_10_descent": dict(alpha_units="dog", momentum_rule="snr", kappa="norm",
                                                      memory=0.99, start_distance=1e-3, dog_weights="distance",
                                                      relative_clip=2.0, clip_update_only=True, clip_trigger=10.0,
                                                      distance_needs_descent=True),
    # the clip as a rate limit: what it cuts is carried to the next steps' updates, not dropped (clip_defers)
    "snr_dowg_update_clip_2_deferred": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                            start_distance=1e-3, dog_weights="distance", relative_clip=2.0,
                                            clip_update_only=True, clip_defers=True),
    # k^2 = 1 / (1 - memory): clip only a gradient whose square alone outweighs the whole running mean it is judged
    # against (at weight 1 - 0.99 it would double it), not the gradient's ordinary growth early in a run
    "snr_dowg_update_clip_10": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                    start_distance=1e-3, dog_weights="distance", relative_clip=10.0,
                                    clip_update_only=True),
    # the same, against a running mean that includes the gradient it judges (as Adam's second moment includes the
    # gradient it divides): a gradient then carries a weight (1 - 0.99) / (1 - 0.99^t) of its own threshold, so the clip
    # cannot act while the mean holds fewer than about k^2 gradients, and is the same as above once it holds ~100
    "snr_dowg_update_clip_2_inclusive": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                             start_distance=1e-3, dog_weights="distance", relative_clip=2.0,
                                             clip_update_only=True, clip_mean_includes_current=True),
    "snr_dog_update_clip_2": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                                  start_distance=1e-3, relative_clip=2.0, clip_update_only=True),
    "snr_anchor_uniform": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99,
                               start_distance=1e-3, dog_weights="anchor_uniform"),
    "snr_dog_recent": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, start_distance=1e-3,
                           dog_weights="recent"),
    # its control: plain SGD on snr_dog's effective step, which is DoG's step (without DoG's iterate average)
    "control_snr_dog": dict(alpha_units="dog", momentum_rule="snr", kappa="norm", memory=0.99, without_momentum=True),
    "ds_growth_10": dict(alpha_units="distance_secant", momentum_rule="snr", kappa="norm", anchor="previous",
                         secant_is="max", max_growth=10.0),
    "step_secant_max": dict(alpha_units="secant", anchor="previous", secant_is="max"),
    "step_secant_max_kappa": dict(alpha_units="secant", anchor="previous", secant_is="max", kappa="norm"),
    "step_secant_max_snr": dict(alpha_units="secant", anchor="previous", secant_is="max", momentum_rule="snr"),
    "step_secant_max_snr_kappa": dict(alpha_units="secant", anchor="previous", secant_is="max",
                                      momentum_rule="snr", kappa="norm"),
    "step_secant_kappa": dict(alpha_units="secant", anchor="previous", kappa="norm"),
    "secant_fast": dict(alpha_units="secant", memory=0.99),
    "secant_snr_fast": dict(alpha_units="secant", momentum_rule="snr", memory=0.99),
}
TASK_STEPS = {"quadratic": 3000, "digits_mlp": 600, "logreg": 2000, "char_lstm": 1500, "autoencoder": 2000,
              "fmnist_resnet8": 300, "fmnist_resnet": 300}  # cheap first
LOSS_SCALES = (1e-4, 1.0, 1e4)


class MovingAnchor:
    """DoG's step measured about a moving anchor, a running average of the iterates, instead of x0 (docs/tuner.md
    §13): xbar_t = xbar_(t-1) + w_t (x_t - xbar_(t-1)), r_t = ||x_t - xbar_t|| (not kept at its maximum). Since
    e_t = x_t - xbar_t = (1 - w_t)(e_(t-1) + xi_t), the sum S_t = (1 - w_t)^2 (S_(t-1) + G_t) is what r_t^2 would be,
    step for step, if the iterate did a random walk of unit step and gradient norms^2 G: the step r_t / sqrt(S_t)
    is neutral under noise (w = 0 is DoG). Where the iterate drifts, r grows faster than the walk and the step with
    it; where it returns towards its average (near a minimum, or oscillating), r falls below the walk's and the step
    falls (as c / (h t) near a minimum with the uniform average)."""

    def __init__(self, x0: torch.Tensor):
        self.point, self.walk_sum = x0.clone(), 0.0

    def effective_step(self, x: torch.Tensor, weight: float, sq_norm: float, floor: float,
                       metric: torch.Tensor | None = None) -> float:
        """Move the anchor towards x by ``weight``, take in the gradient's squared norm, return r / sqrt(S)."""
        self.point.lerp_(x, weight)
        self.walk_sum = (1.0 - weight) ** 2 * (self.walk_sum + sq_norm)
        offset_sq = (x - self.point) ** 2
        r = float(torch.sqrt((offset_sq if metric is None else metric * offset_sq).sum()))
        return max(floor, r) / math.sqrt(max(self.walk_sum, 1e-300))


class FlatTuner(torch.optim.Optimizer):
    """The reference tuner on a flat float64 copy of the parameters, with one decision switchable at a time."""

    def __init__(self, params, alpha_units: str = "gradient", momentum_rule: str = "reference",
                 kappa: str = "squared", start_distance: float = 1e-6, memory: float = 0.999,
                 max_growth: float = 2.0, anchor: str = "average", curvature_memory: float | None = None,
                 secant_is: str = "min", noise_correction: bool | str = True, edge_guard: bool = False,
                 dog_cap: bool = False, without_momentum: bool = False, dog_weights: str = "uniform",
                 momentum_floor: float = 0.0, max_effective_step: float = math.inf,
                 step_growth: float = math.inf, relative_clip: float = math.inf, clip_update_only: bool = False,
                 clip_mean_includes_current: bool = False, clip_defers: bool = False,
                 clip_trigger: float | None = None, linear_growth_after: float = math.inf,
                 distance_needs_descent: bool = False):
        super().__init__(params, {})
        # relative_clip: the gradient's norm clipped at that many times the root of the running mean of ||g||^2
        # (memory 0.99, debiased; from the second step on): a gradient far above every norm the step was calibrated
        # on (the autoencoder's encoder waking on its plateau) is applied while the step's sum catches up with it.
        self.relative_clip, self.clip_sq_avg, self.clip_steps, self.clipped_steps = relative_clip, 0.0, 0, 0
        # clip_update_only: the clip acts on the update alone; every measurement (the step's sum, the running mean
        # square the clip reads, the gradient average) sees the gradient as it came, so that the step reacts to it.
        self.clip_update_only, self.update_factor = clip_update_only, 1.0
        if clip_mean_includes_current and not clip_update_only:
            raise ValueError("clip_mean_includes_current is a form of the update-only clip")
        self.clip_mean_includes_current = clip_mean_includes_current
        # clip_defers: what the clip cuts is not dropped but carried to the next step's update (a rate limit on the
        # gradient applied, not a cut): the whole gradient is applied in the end, spread over the steps it needs.
        if clip_defers and not clip_update_only:
            raise ValueError("clip_defers is a form of the update-only clip")
        self.clip_defers, self.carry = clip_defers, None
        # clip_trigger: the clip acts only on a gradient above that many times the running RMS (and then cuts it to
        # relative_clip times it): an outlier against the memory, not the gradient's ordinary growth
        self.clip_trigger = relative_clip if clip_trigger is None else clip_trigger
        # Diagnostics of the DoG/DoWG start (alpha_units="dog"): max_effective_step caps alpha / (1 - mu) at a fixed
        # value (an oracle: tuned SGD's, to ask whether the size of the step is what keeps a run on a plateau);
        # step_growth lets the effective step grow at most by that factor a step, a bound that the movement the
        # step causes cannot undo, since it holds on the step itself and not on the distance.
        self.max_effective_step, self.step_growth, self.previous_step = max_effective_step, step_growth, math.inf
        # linear_growth_after: from that many steps on, the effective step grows at most in proportion to t (eta_t / t
        # never rises): the growth that a step rule bounded under noise allows (the neutral rule times sqrt(1.5),
        # docs/tuner.md §14.1), imposed only where DoWG's own step outgrows it, as in its runaway near interpolation.
        self.linear_growth_after, self.min_step_per_step = linear_growth_after, math.inf
        # distance_needs_descent: DoG's distance max ||x - x0|| grows only while the running mean (the tuner's memory,
        # debiased) of cos(g, x - x0) is at most 0, i.e. while the loss still falls along the way travelled. Where it
        # rises, the distance is the run leaving (DoWG's runaway near interpolation), not a farther solution.
        self.distance_needs_descent, self.climb_avg, self.climb_steps = distance_needs_descent, 0.0, 0
        # momentum_floor: mu at least this after DoG's first move. At a given effective step eta, heavy ball is stable
        # in the stiff directions up to eta h < 2 (1 + mu) / (1 - mu): where DoG's step overshoots early (the
        # autoencoder's reaches 4x tuned SGD's within 20 steps while the momentum rule still says mu ~ 0.2), a high
        # mu applies it a tenth at a time.
        self.momentum_floor = momentum_floor
        # dog_weights="distance": DoWG's step (Khaled, Mishchenko, Jin 2023) instead of DoG's, d^2 / sqrt(sum_s d_s^2
        # ||g_s||^2): each gradient weighs by the distance reached when it came, so the large early gradients of a
        # run that has not moved yet stop holding the step down. Same units ([x]^2 / [f]), same first step.
        # dog_weights="recent": t times the polynomial (t^8) average of ||g_s||^2 in place of the sum, the weights of
        # the iterate average (yellowfin.tuning.average_weight): the step forgets the run's first gradients as the
        # average forgets its first iterates, without a horizon. Same units, same first step.
        # dog_weights="anchor_uniform": DoG's rule about the iterates' uniform running average instead of x0
        # (MovingAnchor)
        if dog_weights not in ("uniform", "distance", "recent", "anchor_uniform"):
            raise ValueError(f"unknown dog_weights {dog_weights!r}")
        self.dog_weights, self.recent_sq, self.dog_steps = dog_weights, 0.0, 0
        if (alpha_units not in ("gradient", "distance", "secant", "distance_secant", "dog")
                or momentum_rule not in ("reference", "snr", "along_momentum") or kappa not in ("squared", "norm")):
            raise ValueError(f"unknown switch in {alpha_units!r}, {momentum_rule!r}, {kappa!r}")
        self.alpha_units, self.momentum_rule, self.kappa = alpha_units, momentum_rule, kappa
        # along_momentum: signal and noise as running averages of scalars. <g, v> / W (W the sum of the
        # weights of the past gradients in v) estimates ||grad f||^2 without averaging vectors over the memory,
        # which a rotating gradient would cancel; E||g||^2 minus it is the noise C without the drift.
        self.weight_sum, self.signal_avg, self.sq_avg, self.noise_var = 0.0, 0.0, 0.0, None
        # The distance variant grows its own step from r_eps, so it needs no ramp (DoG's warm-up).
        # The secant variant keeps every guard relative (eps far below any measured scale), so that only
        # the measurements, not the guards, decide: the loss-scale screen then tests the estimator itself.
        # The reference's estimators are what every variant starts from (tuning.tune_step gives h_min, h_max and C),
        # so the tuner is pinned: the library's default (the scale-free tuner) would also apply its relative clip
        # to g through c.grad_scale, on top of any clip a variant has (docs/tuner.md §15).
        secant = alpha_units in ("secant", "distance_secant", "dog")
        self.settings = (TunerSettings(tuner="reference", slow_start=False, beta=memory, eps=1e-30,
                                       adaptive_clipping=False) if secant
                         else TunerSettings(tuner="reference", slow_start=alpha_units == "gradient", beta=memory))
        self.max_growth, self.anchor, self.curvature_memory = max_growth, anchor, curvature_memory
        if noise_correction not in (True, False, "relative"):
            raise ValueError(f"unknown noise_correction {noise_correction!r}")
        self.secant_is, self.noise_correction = secant_is, noise_correction
        self.prev_noise = 0.0  # noise_correction="relative": the previous gradient's estimated ||noise||^2
        # edge_guard: alpha <= (1 + sqrt mu)^2 / h_t with h_t the last step's own uncorrected secant (not averaged)
        self.edge_guard, self.raw_secant = edge_guard, 0.0
        # DoG's step d / sqrt(sum_s ||g_s||^2) as the effective step alpha / (1 - mu): alpha_units="dog" sets alpha
        # from it (mu from the momentum rule), dog_cap=True bounds the secant-distance step by it.
        self.dog_cap, self.grad_sq_sum = dog_cap, 0.0
        self.without_momentum = without_momentum  # the control: plain SGD on the effective step alpha / (1 - mu)
        self.secant_window: list[float] = []
        self.log_min_avg = self.log_max_avg = 0.0
        self.range_steps = 0
        self.tuner = TunerState.initial(self.settings)
        self.params = [p for group in self.param_groups for p in group["params"]]
        self.x0 = self._flat(p.detach() for p in self.params).clone()
        self.anchor_point = MovingAnchor(self.x0) if dog_weights.startswith("anchor") else None
        self.grad_avg = torch.zeros_like(self.x0)
        self.velocity = torch.zeros_like(self.x0)
        self.distance = start_distance * (1.0 + float(self.x0.norm()))
        self.distance_floor = self.distance
        self.trace: dict[str, list[float]] = {"mu": [], "alpha": [], "effective_lr": []}
        if relative_clip < math.inf:
            self.trace["clipped"] = []  # 1 on a step whose gradient the relative clip cut, else 0
        if alpha_units in ("secant", "distance_secant"):
            # x_avg: the iterate's running average, the anchor of the secant; s_avg / q_avg the running averages
            # of <g - gbar, x - xbar> and ||x - xbar||^2, whose ratio is the curvature along x - xbar.
            self.x_avg = self.x0.clone()
            self.g_prev = self.x_prev2 = None
            self.s_avg = self.q_avg = 0.0
            self.alpha_prev = 0.0
            self.trace["h_secant"] = []

    @staticmethod
    def _flat(tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors]).double()

    @torch.no_grad()
    def step(self, closure=None):
        g = self._flat(p.grad for p in self.params)
        self.update_factor, self.clip_threshold = 1.0, None
        if self.relative_clip < math.inf:
            clipped_before = self.clipped_steps
            norm_sq = float(g.dot(g))
            if self.clip_mean_includes_current:  # (the mean then moves here, below it is the mean of the steps before)
                self.clip_steps += 1
                self.clip_sq_avg = 0.99 * self.clip_sq_avg + 0.01 * norm_sq
            if self.clip_steps > 0:
                rms = math.sqrt(self.clip_sq_avg / (1.0 - 0.99**self.clip_steps))
                self.clip_threshold = self.relative_clip * rms
                if norm_sq > (self.clip_trigger * rms) ** 2:
                    factor = self.relative_clip * rms / math.sqrt(norm_sq)
                    if self.clip_update_only:
                        self.update_factor = factor
                    else:
                        g = g * factor
                        norm_sq = (self.relative_clip * rms) ** 2
                    self.clipped_steps += 1
            if not self.clip_mean_includes_current:
                self.clip_steps += 1
                self.clip_sq_avg = 0.99 * self.clip_sq_avg + 0.01 * norm_sq
            self.trace["clipped"].append(float(self.clipped_steps > clipped_before))
        x = self._flat(p.detach() for p in self.params)
        one = torch.ones((), dtype=torch.float64)
        # (the scale-free tuner's sums stay zero, unread by the reference it runs)
        sums = Sums.zeros(g)._replace(sq_norm=g.dot(g), cross=self.grad_avg.dot(g),
                                      grad_avg_sq_norm=self.grad_avg.dot(self.grad_avg), numel=g.numel() * one)
        started = self.tuner.step >= 1.0
        state, c = tuning.tune_step(self.tuner, sums, self.settings)
        mu, alpha = c.momentum, c.step_size
        self.grad_avg.mul_(c.avg_decay).add_(c.avg_weight * g)
        if (self.alpha_units, self.momentum_rule, self.kappa) != ("gradient", "reference", "squared"):
            mu, alpha = self._retune(state, g, bool(started))
            state = state.replace(mu=mu, alpha=alpha)
        if self.clip_defers:
            applied = g if self.carry is None else g + self.carry
            limit = self.clip_threshold
            norm = float(applied.norm())
            if limit is not None and norm > limit:
                self.carry, applied = applied * (1.0 - limit / norm), applied * (limit / norm)
            else:
                self.carry = None
            self.velocity.mul_(mu).add_(c.grad_scale * applied)
        else:
            self.velocity.mul_(mu).add_(c.grad_scale * self.update_factor * g)
        self.weight_sum = float(mu) * self.weight_sum + float(c.grad_scale)
        x = x - alpha * self.velocity
        offset = 0
        for p in self.params:
            p.copy_(x[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        self.tuner = state
        mu, alpha = float(mu), float(alpha)
        for key, value in (("mu", mu), ("alpha", alpha), ("effective_lr", alpha / max(1.0 - mu, 1e-12))):
            self.trace[key].append(value)

    def _retune(self, state: TunerState, g: torch.Tensor, started: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = state.h_max / state.h_min
        root_kappa = torch.sqrt(ratio) if self.kappa == "squared" else ratio ** 0.25
        if self.momentum_rule == "reference":
            p = state.dist**2 * state.h_min**2 / (2.0 * state.grad_var)
        elif self.momentum_rule == "snr":
            debias = 1.0 - self.settings.beta ** state.step
            p = self.grad_avg.dot(self.grad_avg) / debias**2 / (2.0 * state.grad_var)
        else:
            beta = self.settings.beta
            weight = (1.0 - beta) / (1.0 - beta ** float(state.step))
            self.sq_avg = (1.0 - weight) * self.sq_avg + weight * float(g.dot(g))
            if self.weight_sum > 0.0:  # (v is empty before the first update)
                signal = float(g.dot(self.velocity)) / self.weight_sum
                self.signal_avg = (signal if self.noise_var is None
                                   else (1.0 - weight) * self.signal_avg + weight * signal)
                self.noise_var = max(self.sq_avg - self.signal_avg, 1e-30 * self.sq_avg)
            p = torch.tensor(max(self.signal_avg, 0.0) / (2.0 * self.noise_var) if self.noise_var else 1.0,
                             dtype=torch.float64)
        sqrt_mu = torch.maximum(tuning.cubic_root(p), (root_kappa - 1.0) / (root_kappa + 1.0))
        sqrt_mu = torch.clamp(sqrt_mu, min=math.sqrt(self.momentum_floor))
        mu = sqrt_mu**2
        if self.alpha_units == "gradient":
            alpha = tuning.slow_start((1.0 - sqrt_mu) ** 2 / state.h_min, state.step - 1.0,
                                      self.settings.curvature_window)
            if not started:
                return torch.tensor(self.settings.initial_momentum), torch.tensor(self.settings.initial_lr)
            return mu, alpha
        x = self._flat(p.detach() for p in self.params)
        if self.alpha_units == "dog":
            displacement = float((x - self.x0).norm())
            if self.distance_needs_descent and displacement > 0.0:
                self.climb_steps += 1
                cosine = float(g.dot(x - self.x0)) / (float(g.norm()) * displacement)
                self.climb_avg += (1.0 - self.settings.beta) * (cosine - self.climb_avg)
            climbing = self.climb_avg / (1.0 - self.settings.beta ** max(self.climb_steps, 1)) > 0.0
            if not (self.distance_needs_descent and climbing):
                self.distance = max(self.distance, displacement)
            weight = self.distance**2 if self.dog_weights == "distance" else 1.0
            self.grad_sq_sum += weight * float(g.dot(g))
            self.dog_steps += 1
            self.recent_sq += float(tuning.average_weight(self.dog_steps)) * (float(g.dot(g)) - self.recent_sq)
            if not started:  # DoG's first step: move r_eps
                self.previous_step = self.distance / float(g.norm())
                return torch.zeros((), dtype=torch.float64), torch.tensor(self.distance / float(g.norm()))
            effective_step = math.sqrt(weight) * self.distance / math.sqrt(self.grad_sq_sum)
            if self.anchor_point is not None:
                effective_step = self.anchor_point.effective_step(x, 1.0 / self.dog_steps, float(g.dot(g)),
                                                                  self.distance_floor)
            if self.dog_weights == "recent":
                effective_step = self.distance / math.sqrt(self.dog_steps * self.recent_sq)
            if self.previous_step < math.inf:
                effective_step = min(effective_step, self.step_growth * self.previous_step)
            effective_step = min(effective_step, self.max_effective_step)
            if self.dog_steps >= self.linear_growth_after:
                effective_step = min(effective_step, self.min_step_per_step * self.dog_steps)
                self.min_step_per_step = min(self.min_step_per_step, effective_step / self.dog_steps)
            self.previous_step = effective_step
            if self.without_momentum:
                return torch.zeros((), dtype=torch.float64), torch.tensor(effective_step, dtype=torch.float64)
            return mu, (1.0 - mu) * effective_step
        self.grad_sq_sum += float(g.dot(g))
        if self.alpha_units == "distance_secant":  # the smaller of the two steps: each bounds the other's failure
            kappa = float(ratio if self.kappa == "squared" else torch.sqrt(ratio))
            self.distance = max(self.distance, float((x - self.x0).norm()))
            mu_s, alpha_s = self._secant(state, g, x, mu, sqrt_mu, started, kappa)
            if not started:
                return mu_s, alpha_s
            alpha_d = (1.0 - sqrt_mu) ** 2 * self.distance / torch.sqrt(state.h_min)
            self.alpha_prev = min(float(alpha_s), float(alpha_d))  # alpha_s already holds the growth cap
            if self.dog_cap:
                self.alpha_prev = min(self.alpha_prev, float(1.0 - mu) * self.distance / math.sqrt(self.grad_sq_sum))
            return mu, torch.tensor(self.alpha_prev, dtype=torch.float64)
        if self.alpha_units == "secant":
            kappa = ratio if self.kappa == "squared" else torch.sqrt(ratio)
            return self._secant(state, g, x, mu, sqrt_mu, started, float(kappa))
        self.distance = max(self.distance, float((x - self.x0).norm()))
        if not started:  # DoG's first step: move r_eps
            return torch.zeros((), dtype=torch.float64), torch.tensor(self.distance / float(g.norm()))
        return mu, (1.0 - sqrt_mu) ** 2 * self.distance / torch.sqrt(state.h_min)


    def _secant(self, state, g, x, mu, sqrt_mu, started, kappa):
        """alpha = (1 - sqrt mu)^2 / h with h the secant curvature between the iterate and its running average.

        For a quadratic the gradient is linear, so the running average of the gradients is the gradient at the
        running average of the iterates, and <g - gbar, x - xbar> / ||x - xbar||^2 is a Rayleigh quotient of the
        Hessian, in loss / parameter^2 units. The step grows at most by ``max_growth`` per step (the safe start:
        from DoG's r_eps move, as fast as the estimates allow).
        """
        beta = self.settings.beta
        weight = (1.0 - beta) / (1.0 - beta ** float(state.step))  # bias-corrected: a plain mean at first
        if self.anchor == "average":
            self.x_avg.mul_(1.0 - weight).add_(weight * x)
            debias = 1.0 - beta ** float(state.step)
            gbar = self.grad_avg / debias
            dx = x - self.x_avg
            s, q = float((g - gbar).dot(dx)), float(dx.dot(dx))
        elif self.anchor == "lagged":
            # The gradient change of the last step along the step before it: <g_t - g_(t-1), x_(t-1) - x_(t-2)>
            # over <x_t - x_(t-1), x_(t-1) - x_(t-2)>. x_(t-1) - x_(t-2) was decided before g_(t-1) and g_t
            # were drawn, so their noise averages out of the numerator: no noise correction is needed, for a
            # quadratic each eigen-direction contributes its curvature to both sums with the same sign.
            s = q = 0.0
            if self.g_prev is not None and self.x_prev2 is not None:
                dx, dx_lag = x - self.x_avg, self.x_avg - self.x_prev2
                s, q = float((g - self.g_prev).dot(dx_lag)), float(dx.dot(dx_lag))
            self.x_prev2, self.x_avg, self.g_prev = self.x_avg.clone(), x.clone(), g.clone()
        else:  # the last step: x - x_prev = -alpha v; E<xi_prev, dx> = -alpha C is removed from the numerator
            dx = x - self.x_avg
            variance = self.noise_var if self.noise_var is not None else float(state.grad_var)
            noise = self.alpha_prev * variance if self.noise_correction else 0.0
            if self.noise_correction == "relative":
                # The noise fraction C / E||g||^2 is a ratio that the averages follow well; the noise of g_prev
                # is that fraction of g_prev's own squared norm, not the average C, which lags when the
                # gradients shrink (at an interpolating solution: a stale C drove the secant to 0, alpha up).
                noise = self.alpha_prev * self.prev_noise
                grad_sq = float(state.grad_sq_avg) / (1.0 - beta ** float(state.step))
                self.prev_noise = min(variance / grad_sq, 1.0) * float(g.dot(g)) if grad_sq > 0.0 else 0.0
            s = float((g - self.g_prev).dot(dx)) - noise if self.g_prev is not None else 0.0
            q = float(dx.dot(dx))
            self.raw_secant = (s + noise) / q if q > 0.0 and s + noise > 0.0 else 0.0
            self.x_avg, self.g_prev = x.clone(), g.clone()
        if self.curvature_memory is not None:
            cbeta = self.curvature_memory
            weight = (1.0 - cbeta) / (1.0 - cbeta ** float(state.step))
        self.s_avg = (1.0 - weight) * self.s_avg + weight * s
        self.q_avg = (1.0 - weight) * self.q_avg + weight * q
        h = self.s_avg / self.q_avg if self.q_avg > 0.0 and self.s_avg > 0.0 else math.inf
        if self.secant_is == "max":  # the secant along the last step sees the stiffest directions: h_max
            h = h / kappa
        elif self.secant_is == "upper":  # alpha at the robust region's upper end, (1 + sqrt mu)^2 / h_max
            h = h * float((1.0 - sqrt_mu) ** 2 / (1.0 + sqrt_mu) ** 2)
        elif self.secant_is == "range" and q > 0.0 and s > 0.0:
            # The curvature range from the spread of the per-step secants over a window (log-smoothed
            # extremes, as the reference smooths its proxies): h_min from the secant itself, and kappa with it.
            self.secant_window = (self.secant_window + [s / q])[-self.settings.curvature_window:]
            self.log_min_avg = beta * self.log_min_avg + (1.0 - beta) * math.log(min(self.secant_window))
            self.log_max_avg = beta * self.log_max_avg + (1.0 - beta) * math.log(max(self.secant_window))
            self.range_steps += 1
            debias_range = 1.0 - beta**self.range_steps
            h_low = math.exp(self.log_min_avg / debias_range)
            h_high = math.exp(self.log_max_avg / debias_range)
            root_kappa = math.sqrt(math.sqrt(h_high / h_low))
            sqrt_mu = torch.maximum(torch.as_tensor(sqrt_mu, dtype=torch.float64),
                                    torch.tensor((root_kappa - 1.0) / (root_kappa + 1.0), dtype=torch.float64))
            mu = sqrt_mu**2
            h = h_low
        elif self.secant_is == "range":
            h = math.inf if self.range_steps == 0 else math.exp(self.log_min_avg / (1.0 - beta**self.range_steps))
        self.trace["h_secant"].append(h if math.isfinite(h) else float("nan"))
        if not started:  # the first step moves r_eps (DoG's start)
            self.alpha_prev = self.distance / float(g.norm())
            return torch.zeros((), dtype=torch.float64), torch.tensor(self.alpha_prev)
        # No positive curvature measured yet (or only noise): hold the step rather than grow it blindly.
        unmeasured = math.inf if self.alpha_units == "distance_secant" else self.alpha_prev
        tuned = float((1.0 - sqrt_mu) ** 2) / h if math.isfinite(h) else unmeasured
        self.alpha_prev = min(tuned, self.max_growth * self.alpha_prev)
        if self.edge_guard and self.raw_secant > 0.0:
            # The last step's own curvature, uncorrected (noise only makes it larger: a safe side), bounds the step
            # at the robust region's upper end, below heavy ball's edge of stability 2 (1 + mu) / h.
            self.alpha_prev = min(self.alpha_prev, float((1.0 + sqrt_mu) ** 2) / self.raw_secant)
        return mu, torch.tensor(self.alpha_prev, dtype=torch.float64)


class AdamMetricTuner(torch.optim.Optimizer):
    """The scale-free rule (``distance_secant`` at memory ``beta``) in Adam's metric (issue 13's first screen).

    With D = sqrt(P) + eps (P the bias-corrected running average of g^2, per coordinate; eps relative to D's
    mean, so the loss scale still cancels), the coordinates y = D^(1/2) x turn Adam's update x -= a g / D into
    plain gradient descent on y: g_y = g / D^(1/2). The tuner measures there, with the metric of this step:
    ||g_y||^2 = sum g^2 / D; the secant <g_t - g_(t-1), x_t - x_(t-1)> / sum D (x_t - x_(t-1))^2 (the numerator
    does not depend on the metric); the distance ||D^(1/2) (x - x0)||; and updates v <- mu v + g_y,
    x <- x - alpha v / D^(1/2). Units: y is in [x]^(1/2) [f]^(1/2), so alpha (in [y]^2 / [f]) is in [x]: it does
    not depend on the loss scale, and neither does the update alpha v / D^(1/2).
    """

    def __init__(self, params, beta: float = 0.99, second_moment_beta: float = 0.999, relative_eps: float = 1e-8,
                 max_growth: float = 2.0, start_distance: float = 1e-6, signal: str = "average",
                 step: str = "distance_secant", without_momentum: bool = False, dog_weights: str = "uniform",
                 monotone: bool = False):
        super().__init__(params, {})
        # monotone: the effective step alpha / (1 - mu) never falls below its largest value so far (as Prodigy's,
        # whose distance estimate only grows and whose denominator is a running average, not a sum): the rule
        # sets the level, and nothing anneals it
        self.monotone, self.effective_max = monotone, 0.0
        # "distance_neutral": DoWG divided by sqrt(2). With the distance growing as sqrt(t) (a random walk: in Adam's
        # metric each coordinate moves about one step a step, whether the run makes progress or not), DoG's step
        # d_t / sqrt(t G) reproduces itself (neutral) and DoWG's d_t^2 / sqrt(sum d_s^2 G), with
        # sum d_s^2 = t d_t^2 / 2, grows by sqrt(2) each time it is measured: the division makes DoWG's fixed point
        # under diffusion DoG's.
        # "anchor_<schedule>": DoG's rule about a moving anchor (MovingAnchor), its weights w_t: "ema" the tuner's
        # bias-corrected memory, "poly" the polynomial average's (gamma 8), "uniform" 1/t, "half" 1/(2t)
        anchors = ("anchor_ema", "anchor_poly", "anchor_uniform", "anchor_half")
        if dog_weights not in ("uniform", "distance", "recent", "distance_neutral", *anchors):
            raise ValueError(f"unknown dog_weights {dog_weights!r}")
        self.dog_weights, self.recent_sq = dog_weights, 0.0
        self.params = [p for group in self.param_groups for p in group["params"]]
        # (the reference's estimators, pinned as in FlatTuner)
        self.settings = TunerSettings(tuner="reference", slow_start=False, beta=beta, eps=1e-30,
                                      adaptive_clipping=False)
        self.tuner = TunerState.initial(self.settings)
        self.second_moment_beta, self.relative_eps, self.max_growth = second_moment_beta, relative_eps, max_growth
        self.x0 = FlatTuner._flat(p.detach() for p in self.params).clone()
        self.anchor = MovingAnchor(self.x0) if dog_weights.startswith("anchor") else None
        self.x_prev, self.g_prev = self.x0.clone(), None
        self.second_moment = torch.zeros_like(self.x0)
        self.grad_avg = torch.zeros_like(self.x0)  # in x coordinates; its y norm is taken with this step's metric
        self.velocity = torch.zeros_like(self.x0)  # in y coordinates
        self.start_length = start_distance * (1.0 + float(self.x0.norm()))  # DoG's r_eps in [x], before the metric
        self.distance = 0.0
        self.s_avg = self.q_avg = 0.0
        self.alpha_prev, self.steps = 0.0, 0
        # signal="along_momentum": no gradient average (three buffers: v, P, x0): the signal is the running
        # average of <g_y, v> / W (W the weight of the past gradients in v) and the noise E||g_y||^2 minus it,
        # both averages of scalars (FlatTuner's momentum_rule="along_momentum", §5's dsm).
        # signal="lag_one": three buffers too, the signal a running average of <g_t, g_(t-1)>, read from the momentum
        # as <g_t, v_(t-1)> - mu_(t-1) <g_(t-1), v_(t-2)> (v_(t-1) = mu_(t-1) v_(t-2) + g_(t-1); the second product
        # stands for <g_t, v_(t-2)>): at the tuner's own memory, whatever the momentum's.
        # signal="lag_one_resolved": lag_one's estimate read at the resolution of the tuner's memory: an average of n
        # gradients at memory beta keeps a fraction r_n = sum_k w_k^2 of the noise, which "average" counts as signal;
        # here signal + r_n C, variance (1 - r_n) C, so that both estimate the same thing.
        if signal not in ("average", "along_momentum", "lag_one", "lag_one_resolved"):
            raise ValueError(f"unknown signal {signal!r}")
        self.prev_dot_momentum, self.prev_mu = 0.0, 0.0
        self.signal = signal
        # step="dog": the effective step alpha / (1 - mu) is DoG's d / sqrt(sum_t ||g_y||^2) in y coordinates
        # (FlatTuner's snr_dog in Adam's metric); "distance_secant": the secant and distance steps, as above.
        if step not in ("distance_secant", "dog"):
            raise ValueError(f"unknown step {step!r}")
        self.step_rule, self.grad_sq_sum = step, 0.0
        self.without_momentum = without_momentum  # the control: plain preconditioned SGD on the effective step
        self.weight_sum, self.signal_avg, self.sq_avg, self.noise_var = 0.0, 0.0, 0.0, None
        self.trace: dict[str, list[float]] = {"mu": [], "alpha": [], "effective_lr": [], "h_secant": []}

    @torch.no_grad()
    def step(self, closure=None):
        g = FlatTuner._flat(p.grad for p in self.params)
        x = FlatTuner._flat(p.detach() for p in self.params)
        self.steps += 1
        b2 = self.second_moment_beta
        self.second_moment.mul_(b2).add_((1.0 - b2) * g * g)
        root = torch.sqrt(self.second_moment / (1.0 - b2**self.steps))
        metric = root + self.relative_eps * root.mean().clamp(min=1e-300)
        one = torch.ones((), dtype=torch.float64)
        sums = Sums.zeros(g)._replace(sq_norm=(g * g / metric).sum(), cross=(self.grad_avg * g / metric).sum(),
                                      grad_avg_sq_norm=(self.grad_avg * self.grad_avg / metric).sum(),
                                      numel=g.numel() * one)
        state, c = tuning.tune_step(self.tuner, sums, self.settings)
        self.grad_avg.mul_(c.avg_decay).add_(c.avg_weight * g)
        beta = self.settings.beta
        debias = 1.0 - beta**self.steps
        ratio = float(state.h_max / state.h_min)
        kappa = math.sqrt(ratio)
        root_kappa = math.sqrt(kappa)
        if self.signal == "average":
            variance = float(state.grad_var)
            snr = float((self.grad_avg * self.grad_avg / metric).sum()) / debias**2 / (2.0 * variance)
        elif self.signal in ("lag_one", "lag_one_resolved"):
            weight = (1.0 - beta) / (1.0 - beta**self.steps)
            self.sq_avg = (1.0 - weight) * self.sq_avg + weight * float(sums.sq_norm)
            dot = float((g / torch.sqrt(metric)).dot(self.velocity))
            if self.steps >= 2:
                sample = dot - self.prev_mu * self.prev_dot_momentum
                self.signal_avg = (sample if self.noise_var is None
                                   else (1.0 - weight) * self.signal_avg + weight * sample)
                self.noise_var = max(self.sq_avg - self.signal_avg, 1e-30 * self.sq_avg)
            self.prev_dot_momentum = dot
            variance = self.noise_var if self.noise_var is not None else float(sums.sq_norm)
            snr = max(self.signal_avg, 0.0) / (2.0 * variance) if self.noise_var is not None else 1.0
            if self.signal == "lag_one_resolved" and self.noise_var is not None:
                n = self.steps
                resolution = (1.0 - beta) * (1.0 - beta ** (2 * n)) / ((1.0 + beta) * (1.0 - beta**n) ** 2)
                signal = max(self.signal_avg, 0.0)
                noise = max(self.sq_avg - signal, 1e-30 * self.sq_avg)
                snr = (signal + resolution * noise) / (2.0 * max((1.0 - resolution) * noise, 1e-30 * self.sq_avg))
        else:
            weight = (1.0 - beta) / (1.0 - beta**self.steps)
            self.sq_avg = (1.0 - weight) * self.sq_avg + weight * float(sums.sq_norm)
            if self.weight_sum > 0.0:
                sample = float((g / torch.sqrt(metric)).dot(self.velocity)) / self.weight_sum
                self.signal_avg = (sample if self.noise_var is None
                                   else (1.0 - weight) * self.signal_avg + weight * sample)
                self.noise_var = max(self.sq_avg - self.signal_avg, 1e-30 * self.sq_avg)
            variance = self.noise_var if self.noise_var is not None else float(sums.sq_norm)
            snr = max(self.signal_avg, 0.0) / (2.0 * variance) if self.noise_var is not None else 1.0
        sqrt_mu = max(float(tuning.cubic_root(snr)), (root_kappa - 1.0) / (root_kappa + 1.0))
        contraction = (1.0 - sqrt_mu) ** 2
        if self.steps == 1:  # DoG's r_eps, 1e-6 (1 + ||x0||) in [x], carried into y by the metric's mean scale
            self.distance = self.start_length * float(torch.sqrt(metric.mean()))
        self.distance = max(self.distance, float(torch.sqrt((metric * (x - self.x0) ** 2).sum())))
        weight = (1.0 - beta) / (1.0 - beta**self.steps)
        dx = x - self.x_prev
        s = 0.0
        if self.g_prev is not None:  # minus the previous gradient's own noise, which the last step carries
            s = float((g - self.g_prev).dot(dx)) - self.alpha_prev * variance
        q = float((metric * dx * dx).sum())
        self.s_avg = (1.0 - weight) * self.s_avg + weight * s
        self.q_avg = (1.0 - weight) * self.q_avg + weight * q
        h = self.s_avg / self.q_avg if self.q_avg > 0.0 and self.s_avg > 0.0 else math.inf
        by_distance = self.dog_weights in ("distance", "distance_neutral")
        self.grad_sq_sum += (self.distance**2 if by_distance else 1.0) * float(sums.sq_norm)
        self.recent_sq += float(tuning.average_weight(self.steps)) * (float(sums.sq_norm) - self.recent_sq)
        if self.anchor is not None:
            schedule = self.dog_weights.removeprefix("anchor_")
            w = {"ema": (1.0 - beta) / (1.0 - beta**self.steps), "poly": 9.0 / (self.steps + 8.0),
                 "uniform": 1.0 / self.steps, "half": 0.5 / self.steps}[schedule]
            r_floor = self.start_length * float(torch.sqrt(metric.mean()))
            anchor_step = self.anchor.effective_step(x, w, float(sums.sq_norm), r_floor, metric)
        if self.steps == 1:  # DoG's first move, without momentum
            mu, alpha = 0.0, self.distance / math.sqrt(float(sums.sq_norm))
        elif self.anchor is not None:
            mu = 0.0 if self.without_momentum else sqrt_mu**2
            alpha = (1.0 - mu) * anchor_step
        elif self.step_rule == "dog":
            mu = 0.0 if self.without_momentum else sqrt_mu**2
            weight = self.distance**2 if by_distance else 1.0
            alpha = (1.0 - mu) * math.sqrt(weight) * self.distance / math.sqrt(self.grad_sq_sum)
            if self.dog_weights == "distance_neutral":
                alpha /= math.sqrt(2.0)
            if self.dog_weights == "recent":
                alpha = (1.0 - mu) * self.distance / math.sqrt(self.steps * self.recent_sq)
        else:
            mu = sqrt_mu**2
            alpha_secant = contraction * kappa / h if math.isfinite(h) else math.inf
            alpha_distance = contraction * self.distance / math.sqrt(float(state.h_min))
            alpha = min(alpha_secant, self.max_growth * self.alpha_prev, alpha_distance)
        if self.monotone:
            self.effective_max = max(self.effective_max, alpha / (1.0 - mu))
            alpha = (1.0 - mu) * self.effective_max
        self.x_prev, self.g_prev, self.alpha_prev, self.tuner = x.clone(), g.clone(), alpha, state
        self.velocity.mul_(mu).add_(g / torch.sqrt(metric))
        self.weight_sum = mu * self.weight_sum + 1.0
        self.prev_mu = mu
        x = x - alpha * self.velocity / torch.sqrt(metric)
        offset = 0
        for p in self.params:
            p.copy_(x[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        for key, value in (("mu", mu), ("alpha", alpha), ("effective_lr", alpha / max(1.0 - mu, 1e-12)),
                           ("h_secant", h if math.isfinite(h) else float("nan"))):
            self.trace[key].append(value)


class PrimalAveragingForm(torch.optim.Optimizer):
    """The library's default tuner as it was before this form became the default (``YellowFin(params,
    momentum_form="heavy_ball")``: its settings and ``tuning.tune_step``) applied in the primal-averaging form of
    heavy ball, with the averaging window lengthened from the momentum's to the run's
    (docs/tuner.md §18).

    Heavy ball is primal averaging: with z_(t+1) = z_t - eta g_t and x_(t+1) = mu x_t + (1 - mu) z_(t+1), x
    moves as x_(t+1) = x_t + mu (x_t - x_(t-1)) - (1 - mu) eta g_t, heavy ball with alpha = (1 - mu) eta; its
    iterate is an average of the plain-SGD sequence z over a window of 1 / (1 - mu) steps. Schedule-Free
    (Defazio et al. 2024) keeps a long average xbar of z (weights ``window``) and takes the gradient at
    y = (1 - b) z + b xbar. Here b is the tuned mu and z's step the tuned effective step eta = alpha / (1 - mu),
    so y still moves by (1 - mu (1 - c)) eta ~ alpha along each gradient, as heavy ball does, while the point that
    holds the history is the run's average instead of the last few iterates. DoG's distance is measured on z (the
    SGD sequence its theory is about). The point handed out is xbar (``hand_out``); the gradients and the training
    loss are at y. Buffers: z, xbar, gbar and x_0 (z could be recovered from y and xbar: three, as heavy ball).
    ``window``: "poly" the library's polynomial average (t^8), "uniform" 1/t, "poly_memory" the polynomial one whose
    weight never falls below 1 - beta (a window no longer than the tuner's memory), "poly_step" the polynomial
    weights times eta_t^2, "poly_descent" the polynomial one whose weight is at least 1 - mu while the average lags a
    descent (the running mean of cos(g, z - xbar) at the tuner's memory below 0: the gradient at y points back
    along z - xbar, where around a minimum it points along it), "poly_scaled" the polynomial weight times 1 - mu,
    never below 1 / t (the uniform average's): a window as many of z's correlation times long as heavy ball's
    average covers of its iterate's (docs/tuner.md §20.1); "poly_scaled_climbing" that window only while the run
    climbs along the way travelled (the distance hold's running cos(g, z - x_0) above 0: around a minimum, where
    the noise dominates), the polynomial one while it descends; "poly_scaled_settled" that window only while the
    average does not lag a descent (the running mean of cos(g, z - xbar) at the tuner's memory at least 0, the
    statistic of "poly_descent"), the polynomial one while it does. ``average_power`` replaces the polynomial weights' power
    (the library's AVERAGE_POWER); ``clip_trigger`` the clip's trigger (None: heavy ball's, as the form was first
    measured; 2.0: today's default).

    Why the last: on a direction whose curvature is negative (a saddle, a plateau's way out) a new deviation of z
    that grows faster than xbar's weight reaches y only as (1 - b) of it, so it grows at alpha lambda where heavy
    ball's grows at alpha lambda / (1 - mu). A window of 1 / (1 - mu) steps while the run descends lets xbar follow
    (heavy ball's own window); around a minimum the run's window is kept. (Not taken: the autoencoder's stuck seeds
    were the relative clip's trigger's, docs/tuner.md §19.)"""

    def __init__(self, params, window: str = "poly", z_step_power: float = 1.0, interpolation_power: float = 1.0,
                 average_power: float | None = None, clip_trigger: float | None = None):
        params = list(params)
        super().__init__(params, {})
        if window not in ("poly", "uniform", "poly_memory", "poly_step", "poly_descent", "poly_scaled",
                          "poly_scaled_climbing", "poly_scaled_settled"):
            raise ValueError(f"unknown window {window!r}")
        self.window, self.params = window, params
        self.z_step_power = z_step_power  # z's step alpha / (1 - mu)^power (1: the effective step)
        # b = 1 - (1 - mu)^power (1: b = mu). y's noise is (1 - b)^2 of z's and a saddle's escape (1 - b) of heavy
        # ball's: at power 1/2 the noise is that of plain SGD at the tuner's alpha, the escape sqrt(1 - mu) of heavy
        # ball's (the geometric mean of the form's and heavy ball's)
        self.interpolation_power = interpolation_power
        # (only to resolve the settings of the default as the form was measured on: heavy ball's, whose clip acts
        # above 10 times the running RMS)
        library = YellowFin(params, momentum_form="heavy_ball", clip_trigger=clip_trigger)
        self.settings = library._settings(library.param_groups[0])
        self.average_power = tuning.AVERAGE_POWER if average_power is None else average_power
        self.tuner = TunerState.initial(self.settings)
        self.x0 = FlatTuner._flat(p.detach() for p in params).clone()
        self.fast, self.average = self.x0.clone(), self.x0.clone()
        self.grad_avg = torch.zeros_like(self.x0)
        self.x0_sq, self.steps = float(self.x0.dot(self.x0)), 0
        self.poly_weight, self.weight_sum = 0.0, 0.0  # ("poly_step": the weights a_t eta_t^2 and their sum)
        self.lag_cos = 0.0  # ("poly_descent": the running mean of cos(g, z - xbar), not bias-corrected)
        self.trace: dict[str, list[float]] = {"mu": [], "alpha": [], "effective_lr": []}

    @torch.no_grad()
    def step(self, closure=None):
        g = FlatTuner._flat(p.grad for p in self.params)
        displacement = self.fast - self.x0
        f64 = lambda v: torch.as_tensor(float(v), dtype=torch.float64)  # noqa: E731
        sq_norm = g.dot(g)
        sums = Sums.zeros(g)._replace(sq_norm=f64(sq_norm), cross=f64(self.grad_avg.dot(g)),
                                      grad_avg_sq_norm=f64(self.grad_avg.dot(self.grad_avg)), numel=f64(g.numel()),
                                      grad_sq_norm_lr=f64(sq_norm), displacement_sq=f64(displacement.dot(displacement)),
                                      initial_param_sq_norm=f64(self.x0_sq),
                                      grad_dot_displacement=f64(g.dot(displacement)))
        self.tuner, c = tuning.tune_step(self.tuner, sums, self.settings)
        if not bool(c.finite):
            return
        if self.window in ("poly_descent", "poly_scaled_settled"):
            self._measure_lag(g)
        self.grad_avg.mul_(float(c.avg_decay)).add_(float(c.avg_weight) * g)
        mu, alpha = float(c.momentum), float(c.step_size)
        eta = alpha / (1.0 - mu) ** self.z_step_power
        self.fast.add_(g, alpha=-eta * float(c.grad_scale))
        self.steps += 1
        self._average_and_interpolate(mu, alpha, eta)

    def _measure_lag(self, g: torch.Tensor, lead_scale: torch.Tensor | float = 1.0) -> None:
        """The running mean of cos(g, z - xbar) at the tuner's memory, g taken at y (``poly_descent``); in Adam's
        metric g comes as M^(-1/2) g and ``lead_scale`` is M^(1/2)."""
        lead = (self.fast - self.average) * lead_scale
        norms = float(g.norm()) * float(lead.norm())
        cosine = float(g.dot(lead)) / norms if norms > 0.0 else 0.0
        beta = self.settings.beta
        self.lag_cos = beta * self.lag_cos + (1.0 - beta) * cosine

    def _average_and_interpolate(self, mu: float, alpha: float, eta: float) -> float:
        if self.window == "uniform":
            weight = 1.0 / self.steps
        elif self.window == "poly_step":  # a_t eta_t^2 / sum_s a_s eta_s^2, a_t the polynomial weights
            k = float(self.average_power)
            growth = (self.steps + k - 1.0) / (self.steps - 1.0) if self.steps > 1 else 1.0
            self.poly_weight = 1.0 if self.steps == 1 else self.poly_weight * growth
            self.weight_sum += self.poly_weight * eta * eta
            weight = self.poly_weight * eta * eta / self.weight_sum
        else:
            k = float(self.average_power)
            weight = (k + 1.0) / (self.steps + k)  # (tuning.average_weight at the library's power)
            climbing = self.window == "poly_scaled_climbing" and float(self.tuner.climb_avg) > 0.0
            settled = self.window == "poly_scaled_settled" and self.lag_cos >= 0.0
            if self.window == "poly_scaled" or climbing or settled:  # (z's correlation time is 1 / (1 - mu) heavy ball's)
                weight = max(weight * (1.0 - mu), 1.0 / self.steps)
            if self.window == "poly_memory":  # (the window never longer than the tuner's memory, 1 / (1 - beta))
                weight = max(weight, 1.0 - self.settings.beta)
            if self.window == "poly_descent" and self.lag_cos < 0.0:  # (the average lags a descent)
                weight = max(weight, 1.0 - mu)
        self.average.lerp_(self.fast, weight)
        b = 1.0 - (1.0 - mu) ** self.interpolation_power
        y = (1.0 - b) * self.fast + b * self.average
        offset = 0
        for p in self.params:
            p.copy_(y[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        for key, value in (("mu", mu), ("alpha", alpha), ("effective_lr", eta)):
            self.trace[key].append(value)
        return weight

    @torch.no_grad()
    def hand_out(self, model: nn.Module) -> None:
        """Put the average xbar into ``model``'s parameters (a copy of the trained model)."""
        offset = 0
        for p in model.parameters():
            p.copy_(self.average[offset: offset + p.numel()].view_as(p))
            offset += p.numel()


class PreconditionedPrimalAveragingForm(PrimalAveragingForm):
    """``PrimalAveragingForm`` in Adam's metric: the library's ``precondition="adam"`` default (its settings and
    ``tuning.tune_step``), z's step eta M^(-1) g with M that step's metric, DoG's distance ||z - x_0||_M. Its
    momentum signal is the library's lag-one product <g_t, g_(t-1)>, read here from a heavy-ball momentum kept for
    that alone (a prototype's fourth buffer: the form leaves no momentum to read it from). ``clip_trigger``: the
    plain metric's relative clip, at its level and acting above that level as in the plain form's default (§19),
    applied to the metric's norm of g.
    ``start_from_x0_norm``: DoG's first move r (1 + ||x_0||), carried into the metric's units, as the library's;
    False is the slip of §18's first run of this prototype, whose first move left out ||x_0|| (r alone: on the
    autoencoder about 26 times smaller than the library's), kept so that those runs reproduce.

    ``signal="lead"`` reads the signal without the fourth buffer, along the form's own w = z - xbar: w is minus the
    gradients (in the metric, times z's steps eta_k s_k) summed with the average's decay, so with W_t = (1 - c_t)
    (W_(t-1) + eta_t s_t) the same sum of the steps alone, -<g_t, w_(t-1)> / W_(t-1) is a weighted mean of the lagged
    products <g_t, g_k>_(M^-1) over the average's window: ||E g||^2 where the mean gradient holds still over that
    window, less where it turns (a signal read low: the momentum rule then sits at the bound its memory resolves).
    Its noise is small (the window averages it). It enters the library's running mean as the lag-one sample does."""

    def __init__(self, params, window: str = "poly", clip_trigger: float | None = None,
                 start_from_x0_norm: bool = True, signal: str = "lag_one"):
        super().__init__(params, window)
        if signal not in ("lag_one", "lead"):
            raise ValueError(f"unknown signal {signal!r}")
        self.start_from_x0_norm, self.signal, self.lead_weight = start_from_x0_norm, signal, 0.0
        # (the settings of heavy ball in Adam's metric, as the form was measured: the prototype keeps its own signal)
        clip = {} if clip_trigger is None else dict(relative_clip=clip_trigger, clip_trigger=clip_trigger)
        library = YellowFin(self.params, precondition="adam", momentum_form="heavy_ball", **clip)
        self.settings = library._settings(library.param_groups[0])
        self.tuner = TunerState.initial(self.settings)
        self.second_moment = torch.zeros_like(self.x0)
        self.signal_momentum = torch.zeros_like(self.x0) if signal == "lag_one" else None
        self.grad_avg = None

    @torch.no_grad()
    def step(self, closure=None):
        g = FlatTuner._flat(p.grad for p in self.params)
        floor = measurements.metric_floor(self.tuner)
        next_moment = measurements.next_second_moment(self.second_moment, g)
        metric = measurements.adam_metric(next_moment, torch.tensor(self.steps + 1.0, dtype=torch.float64), floor)
        displacement = self.fast - self.x0
        f64 = lambda v: torch.as_tensor(float(v), dtype=torch.float64)  # noqa: E731
        scaled = g / torch.sqrt(metric)
        if self.signal == "lead":  # (the sample itself: nothing carried from the step before)
            lead_product = -float(g.dot(self.fast - self.average))
            grad_dot_momentum = lead_product / self.lead_weight if self.lead_weight > 0.0 else 0.0
            self.tuner = self.tuner.replace(carried_grad_dot_momentum=torch.zeros((), dtype=torch.float64))
        else:
            grad_dot_momentum = scaled.dot(self.signal_momentum)
        sums = Sums.zeros(g)._replace(sq_norm=f64(scaled.dot(scaled)), numel=f64(g.numel()),
                                      displacement_sq=f64((metric * displacement * displacement).sum()),
                                      grad_dot_displacement=f64(g.dot(displacement)),
                                      grad_dot_momentum=f64(grad_dot_momentum),
                                      metric_sum=f64(metric.sum()),
                                      initial_param_sq_norm=f64(self.x0_sq if self.start_from_x0_norm else 0.0))
        self.tuner, c = tuning.tune_step(self.tuner, sums, self.settings)
        if not bool(c.finite):
            return
        if self.window in ("poly_descent", "poly_scaled_settled"):  # (the cosine in the metric's norms)
            self._measure_lag(scaled, torch.sqrt(metric))
        self.second_moment = next_moment
        mu, alpha, grad_scale = float(c.momentum), float(c.step_size), float(c.grad_scale)
        if self.signal_momentum is not None:
            self.signal_momentum.mul_(mu).add_(scaled, alpha=grad_scale)
        eta = alpha / (1.0 - mu)
        self.fast.add_(scaled / torch.sqrt(metric), alpha=-eta * grad_scale)
        self.steps += 1
        weight = self._average_and_interpolate(mu, alpha, eta)
        self.lead_weight = (1.0 - weight) * (self.lead_weight + eta * grad_scale)


PRIMAL_AVERAGING_VARIANTS = {"primal_averaging_poly": dict(window="poly"),
                             "primal_averaging_uniform": dict(window="uniform"),
                             # the polynomial window, never longer than the tuner's memory: on a steady descent the
                             # average lags z by about a tenth of the run (t^8 weights), at most ~1 / (1 - beta) here
                             "primal_averaging_poly_memory": dict(window="poly_memory"),
                             # the polynomial weights times the step squared (Schedule-Free's lr^2 weighting): a growing
                             # step weighs the recent iterates more (the autoencoder's), a falling one the older
                             "primal_averaging_poly_step": dict(window="poly_step"),
                             # heavy ball's window 1 / (1 - mu) while the average lags a descent (a saddle's escape)
                             "primal_averaging_poly_descent": dict(window="poly_descent"),
                             # z's step alpha / (1 - mu)^2: y's first response to a gradient is heavy ball's lasting
                             # one, alpha / (1 - mu), so a saddle's mode grows at heavy ball's rate, not (1 - mu) of it
                             "primal_averaging_poly_fast_z": dict(window="poly", z_step_power=2.0),
                             # b = 1 - sqrt(1 - mu): y's noise that of plain SGD at alpha, a saddle's escape sqrt(1 - mu)
                             # of heavy ball's instead of (1 - mu) of it
                             "primal_averaging_poly_sqrt_b": dict(window="poly", interpolation_power=0.5),
                             # (its first move left out ||x_0||: the runs of §18, docs/tuner.md §20.2)
                             "adam_metric_primal_averaging_poly": dict(window="poly", precondition=True,
                                                                       start_from_x0_norm=False),
                             # the same, from the library's first move
                             "adam_metric_primal_averaging_start": dict(window="poly", precondition=True),
                             # the form in Adam's metric with the plain form's clip at its level (§19's plateau answer)
                             "adam_metric_primal_averaging_trigger_2": dict(window="poly", precondition=True,
                                                                            clip_trigger=2.0),
                             # and heavy ball's window 1 / (1 - mu) while the average lags a descent: the form's
                             # lag behind a steady descent is what it loses on the autoencoder there
                             "adam_metric_primal_averaging_descent_trigger_2": dict(window="poly_descent",
                                                                                    precondition=True,
                                                                                    clip_trigger=2.0),
                             # three buffers (P, w, x_0): the signal read along w instead of a kept momentum
                             "adam_metric_primal_averaging_lead_trigger_2": dict(window="poly", precondition=True,
                                                                                 clip_trigger=2.0, signal="lead"),
                             # today's default (the clip at its level, §19, §20), and its average over a longer window
                             # (§20.1): the power 2 instead of 8, and the weights scaled by 1 - mu
                             "primal_averaging_trigger_2": dict(window="poly", clip_trigger=2.0),
                             "primal_averaging_power_2_trigger_2": dict(window="poly", average_power=2.0,
                                                                        clip_trigger=2.0),
                             "primal_averaging_scaled_trigger_2": dict(window="poly_scaled", clip_trigger=2.0),
                             "primal_averaging_scaled_climbing_trigger_2": dict(window="poly_scaled_climbing",
                                                                                clip_trigger=2.0),
                             "primal_averaging_scaled_settled_trigger_2": dict(window="poly_scaled_settled",
                                                                               clip_trigger=2.0)}


ADAM_METRIC_VARIANTS = {"adam_metric_ds": {}, "adam_metric_ds_memory_0.999": dict(beta=0.999),
                        "adam_metric_dsm": dict(signal="along_momentum"), "adam_metric_dog": dict(step="dog"),
                        # three buffers (P, v, x0): the signal along the momentum, no gradient average
                        "adam_metric_dog_signal_along_momentum": dict(step="dog", signal="along_momentum"),
                        "adam_metric_dog_signal_lag_one": dict(step="dog", signal="lag_one"),
                        "adam_metric_dog_signal_lag_one_resolved": dict(step="dog", signal="lag_one_resolved"),
                        # (the library's preconditioned tuner) with DoG's start r_eps = s (1 + ||x0||) larger
                        "adam_metric_dog_start_1e-4": dict(step="dog", signal="lag_one_resolved", start_distance=1e-4),
                        "adam_metric_dog_start_1e-3": dict(step="dog", signal="lag_one_resolved", start_distance=1e-3),
                        "adam_metric_dowg_start_1e-3": dict(step="dog", signal="lag_one_resolved", start_distance=1e-3,
                                                            dog_weights="distance"),
                        "adam_metric_dowg_neutral": dict(step="dog", signal="lag_one_resolved", start_distance=1e-3,
                                                         dog_weights="distance_neutral"),
                        # DoG's first move ten times larger (r_eps = 1e-2 (1 + ||x0||)): does the start set the level?
                        "adam_metric_dowg_neutral_start_1e-2": dict(step="dog", signal="lag_one_resolved",
                                                                    start_distance=1e-2,
                                                                    dog_weights="distance_neutral"),
                        "adam_metric_dowg_neutral_monotone": dict(step="dog", signal="lag_one_resolved",
                                                                  start_distance=1e-3, dog_weights="distance_neutral",
                                                                  monotone=True),
                        "adam_metric_anchor_ema": dict(step="dog", signal="lag_one_resolved", start_distance=1e-3,
                                                       dog_weights="anchor_ema"),
                        "adam_metric_anchor_poly": dict(step="dog", signal="lag_one_resolved", start_distance=1e-3,
                                                        dog_weights="anchor_poly"),
                        # between DoG (w = 0) and the uniform anchor (w = 1/t): the anchor keeps a memory of x0
                        # that fades as t^(-1/2)
                        "adam_metric_anchor_half": dict(step="dog", signal="lag_one_resolved", start_distance=1e-3,
                                                        dog_weights="anchor_half"),
                        "adam_metric_anchor_uniform": dict(step="dog", signal="lag_one_resolved",
                                                           start_distance=1e-3, dog_weights="anchor_uniform"),
                        "adam_metric_dog_recent": dict(step="dog", signal="lag_one_resolved", start_distance=1e-3,
                                                       dog_weights="recent"),
                        # its control: the same rule in the same metric without momentum
                        "control_adam_metric_dog_start_1e-3": dict(step="dog", signal="lag_one_resolved",
                                                                   start_distance=1e-3, without_momentum=True),
                        # its control: the same effective step in Adam's metric, without momentum
                        "control_adam_metric_dog": dict(step="dog", without_momentum=True)}


# The library's own optimizer, as the screen's other variants see it (same tasks, seeds and records):
# "per_tensor" puts every parameter tensor in a group of its own, so each tensor gets its own distance, gradient
# sum and momentum (layer-wise DoG, Ivgi, Hinder, Carmon 2023 §4: a block-diagonal metric between the plain
# metric's one scalar and Adam's per-coordinate one).
LIBRARY_VARIANTS: dict[str, Callable] = {
    "library_default": lambda params: YellowFin(params),
    # (Adam's metric's default as the screens measured it: heavy ball, before its form became the default, §21)
    "library_adam_default": lambda params: YellowFin(params, precondition="adam", momentum_form="heavy_ball"),
    # (the rules in heavy ball, as measured before the primal-average form became the default)
    "library_dowg": lambda params: YellowFin(params, tuner="scale_free", step_rule="dowg", relative_clip=math.inf,
                                             momentum_form="heavy_ball"),
    "library_dowg_per_tensor": lambda params: YellowFin([{"params": [p]} for p in params], tuner="scale_free",
                                                        step_rule="dowg", per_group_tuning=True,
                                                        relative_clip=math.inf, momentum_form="heavy_ball"),
    "library_dog_per_tensor": lambda params: YellowFin([{"params": [p]} for p in params], tuner="scale_free",
                                                       step_rule="dog", per_group_tuning=True,
                                                       relative_clip=math.inf, momentum_form="heavy_ball"),
}

AVERAGED = "_poly_avg"  # a variant name ending so: that variant, handing out its iterates' polynomial average
TUNED_SGD = "tuned_sgd"  # the suite's tuned momentum SGD (lr from benchmarks/results), the average's control


class PolynomialAverage:
    """The iterates' average with weights growing as t^gamma (Shamir & Zhang 2013; DoG's gamma = 8):
    xbar_t = xbar_(t-1) + (gamma + 1) / (t + gamma) (x_t - xbar_(t-1)). It forgets the early iterates as the run
    goes on (at step t it covers about the last t / (gamma + 1) of them) and needs no horizon."""

    def __init__(self, model: nn.Module, gamma: float = 8.0):
        import copy

        self.model, self.gamma, self.steps = model, gamma, 0
        self.averaged_model = copy.deepcopy(model)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        weight = (self.gamma + 1.0) / (self.steps + self.gamma)
        for averaged, current in zip(self.averaged_model.parameters(), self.model.parameters()):
            averaged.lerp_(current, weight)
        for averaged, current in zip(self.averaged_model.buffers(), self.model.buffers()):
            averaged.copy_(current)  # batch-norm statistics: the current ones (refreshed before evaluation)


def tuned_sgd_lr(task_name: str) -> float:
    """The suite's chosen learning rate for momentum SGD on task_name (the one run on every seed)."""
    files = (Path(__file__).resolve().parent / "results" / task_name).glob("sgd_momentum_lr*_seed1_*.json")
    return float(next(iter(files)).name.split("_lr")[1].split("_seed")[0])


def builder(variant: str, task_name: str | None = None) -> Callable:
    if variant == TUNED_SGD:
        lr = tuned_sgd_lr(task_name)
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)
    if variant == "reference":
        return lambda params: YellowFin.reference_variant(params)
    if variant in LIBRARY_VARIANTS:
        return LIBRARY_VARIANTS[variant]
    if variant in ADAM_METRIC_VARIANTS:
        return lambda params: AdamMetricTuner(params, **ADAM_METRIC_VARIANTS[variant])
    if variant in PRIMAL_AVERAGING_VARIANTS:
        options = dict(PRIMAL_AVERAGING_VARIANTS[variant])
        form = PreconditionedPrimalAveragingForm if options.pop("precondition", False) else PrimalAveragingForm
        return lambda params: form(params, **options)
    return lambda params: FlatTuner(params, **VARIANTS[variant])


def run_task(task_name: str, variant: str, seed: int, steps: int) -> dict:
    task = get_task(task_name)
    model = task.make_model(seed)
    base = variant.removesuffix(AVERAGED)
    optimizer = builder(base, task_name)(model.parameters())
    averager = PolynomialAverage(model) if variant.endswith(AVERAGED) else None
    evaluated = averager.averaged_model if averager is not None else model  # the point handed out
    handing_out = hasattr(optimizer, "hand_out")  # (an optimizer whose point handed out is not its iterate)
    if handing_out:
        import copy

        evaluated = copy.deepcopy(model)
    batches, losses, exact, at_iterate = task.train_batches(seed), [], [], []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, next(batches))
        loss.backward()
        optimizer.step()
        if averager is not None:
            averager.step()
        if handing_out:
            optimizer.hand_out(evaluated)
            for kept, current in zip(evaluated.buffers(), model.buffers()):
                kept.copy_(current)  # batch-norm statistics: the current ones, as the average's
        losses.append(float(loss.detach()))
        if task_name == "quadratic":
            exact.append(task.exact_loss(evaluated))
            if handing_out:
                at_iterate.append(task.exact_loss(model))
    best = metrics.best_point(metrics.smooth(losses))
    return {"task": task_name, "variant": variant, "seed": seed, "steps": steps,
            "losses": [finite_or_none(v) for v in losses],
            "exact_loss": [finite_or_none(v) for v in exact] or None,
            # (an optimizer that hands out another point: the exact loss where it takes its gradients)
            "exact_loss_at_iterate": [finite_or_none(v) for v in at_iterate] or None,
            "best_smoothed_loss": finite_or_none(best[0] if best else math.nan),
            "eval": {k: finite_or_none(v) for k, v in task.evaluate(evaluated, "val").items()},
            "trace": {key: [finite_or_none(v) for v in values]
                      for key, values in getattr(optimizer, "trace", {}).items()} or None}


def run_loss_scale(variant: str, seed: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import loss_scale  # the 20-64-1 tanh MLP of benchmarks/loss_scale.py

    data = loss_scale.regression_data()
    finals = {str(c): finite_or_none(loss_scale.train(builder(variant), c, loss_scale.BATCH, seed, data))
              for c in LOSS_SCALES}
    return {"task": "loss_scale", "variant": variant, "seed": seed, "final_mse": finals}


def tuned_best(task_name: str, optimizer: str = "sgd_momentum") -> float | None:
    """Best smoothed loss of the suite's grid-tuned ``optimizer`` (its chosen lr, mean over seeds), if it was run."""
    files = sorted((Path(__file__).resolve().parent / "results" / task_name).glob(f"{optimizer}_lr*_seed*.json"))
    by_lr: dict[str, list[float]] = {}
    for path in files:
        record = json.loads(path.read_text())
        best = metrics.best_point(metrics.smooth(record["loss"]))
        by_lr.setdefault(path.name.split("_seed")[0], []).append(best[0] if best else math.inf)
    multi_seed = [values for values in by_lr.values() if len(values) >= 2]  # the chosen lr ran on every seed
    return statistics.mean(multi_seed[0]) if len(multi_seed) == 1 else None


def final_smoothed_loss(record: dict) -> float:
    """The run's smoothed training loss at its last step (the quadratic: its final exact excess loss)."""
    if record["task"] == "quadratic":
        return record["eval"]["excess_loss"]
    losses = [math.inf if v is None else v for v in record["losses"]]
    return float(metrics.smooth(losses)[-1])


def table(results: list[dict]) -> str:
    lines = ["Best smoothed training loss (mean ± std over seeds; quadratic: also the final exact excess loss), "
             "one row per variant.", ""]
    known = ["reference", TUNED_SGD, *VARIANTS, *ADAM_METRIC_VARIANTS, *PRIMAL_AVERAGING_VARIANTS, *LIBRARY_VARIANTS]
    variants = [v for base in known for v in (base, base + AVERAGED) if any(r["variant"] == v for r in results)]
    tasks = [t for t in TASK_STEPS if any(r["task"] == t for r in results)]
    lines += ["| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label, optimizer in (("tuned momentum SGD", "sgd_momentum"), ("tuned Adam", "adam")):
        baselines = [tuned_best(task_name, optimizer) for task_name in tasks]
        lines.append(f"| {label} | " + " | ".join("-" if b is None else f"{b:.4g}" for b in baselines) + " |")
    for variant in variants:
        cells = []
        for task_name in tasks:
            runs = [r for r in results if r["task"] == task_name and r["variant"] == variant]
            cell = _mean_std([r["best_smoothed_loss"] for r in runs])
            if task_name == "quadratic" and runs:
                cell += f" ({_mean_std([r['eval']['excess_loss'] for r in runs])})"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    scale_runs = [r for r in results if r["task"] == "loss_scale"]
    if scale_runs:
        lines += ["", "Loss multiplied by c (20-64-1 tanh MLP, 300 steps, batch 32): final full-batch MSE.", "",
                  "| variant | " + " | ".join(f"c = {c:g}" for c in LOSS_SCALES) + " |",
                  "|---" * (len(LOSS_SCALES) + 1) + "|"]
        for variant in variants:
            runs = [r for r in scale_runs if r["variant"] == variant]
            if runs:
                lines.append(f"| {variant} | " + " | ".join(
                    _mean_std([r["final_mse"][str(c)] for r in runs]) for c in LOSS_SCALES) + " |")
    lines += ["", "Final smoothed training loss (quadratic: final exact excess loss), mean ± std over seeds, for the "
              "variants run on three seeds (the measure of `yellowfin ablate`'s overview).", "",
              "| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for variant in variants:
        by_task = [[r for r in results if r["task"] == t and r["variant"] == variant] for t in tasks]
        if any(len(runs) >= 3 for runs in by_task):
            lines.append(f"| {variant} | " + " | ".join(
                _mean_std([final_smoothed_loss(r) for r in runs]) for runs in by_task) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if any(v is None or not math.isfinite(v) for v in values):
        return "diverged"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {spread:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["loss_scale", *TASK_STEPS])
    parser.add_argument("--variants", nargs="+", default=["reference", *VARIANTS, *ADAM_METRIC_VARIANTS],
                        help=f"names from VARIANTS or ADAM_METRIC_VARIANTS, 'reference' or '{TUNED_SGD}'; "
                             f"'<name>{AVERAGED}' hands out the iterates' polynomial average (gamma 8)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=None,
                        help="a budget other than the task's (results go to <task>-<steps>steps/, outside the table)")
    parser.add_argument("--table", action="store_true",
                        help="run nothing: rewrite screen.md from every results file present")
    args = parser.parse_args(argv)
    if args.table:
        text = table([json.loads(path.read_text()) for path in sorted(OUT.glob("*/*_seed*.json"))
                      if path.parent.name in TASK_STEPS or path.parent.name == "loss_scale"])
        (OUT / "screen.md").write_text(text)
        print(text)
        return 0
    torch.set_num_threads(1)
    results = []
    for task_name in args.tasks:
        for variant in args.variants:
            for seed in args.seeds:
                folder = task_name if args.steps is None else f"{task_name}-{args.steps}steps"
                path = OUT / folder / f"{variant}_seed{seed}.json"
                if path.exists():
                    results.append(json.loads(path.read_text()))
                    continue
                start = time.monotonic()
                if task_name == "loss_scale":
                    record = run_loss_scale(variant, seed)
                else:
                    record = run_task(task_name, variant, seed, args.steps or TASK_STEPS[task_name])
                record["seconds"] = time.monotonic() - start
                path.parent.mkdir(parents=True, exist_ok=True)
                write_result(path, record)
                results.append(record)
                print(f"{task_name} {variant} seed {seed}: {time.monotonic() - start:.0f} s", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
