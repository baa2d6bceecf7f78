"""YellowFin variants for ablations, registered in one place.

A variant is a name, one line saying what it changes, and a builder: either a set of YellowFin constructor
overrides applied on top of the reference, or a named builder (such as YellowFin.paper_variant). Each variant
becomes an OptimizerSpec named ``yf_<variant>`` that the benchmark runner runs like any other optimizer, so the
ablation writes the usual results files.

    from yellowfin.bench.variants import VARIANTS, register_variant
    register_variant(Variant("beta_0.99", "curvature/variance memory of ~100 steps", overrides={"beta": 0.99}))

The control is a variant too: plain SGD replaying the reference variant's effective step alpha_t / (1 - mu_t).
"""

from __future__ import annotations

import dataclasses
import math

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from yellowfin.bench.optimizers import CONTROL, UNTUNED, OptimizerSpec, plain_sgd, yellowfin_average_if_kept
from yellowfin.state import INITIAL_DISTANCE_BEFORE_THE_OPTION, outlier_trigger

SPEC_PREFIX = "yf_"
REFERENCE = "reference"


def _reference(params: Iterable, **overrides: Any) -> torch.optim.Optimizer:
    from yellowfin import YellowFin

    return YellowFin.reference_variant(params, **overrides)  # the authors' algorithm, whatever the defaults


def _default(params: Iterable, **overrides: Any) -> torch.optim.Optimizer:
    from yellowfin import YellowFin

    return YellowFin(params, **overrides)  # whatever YellowFin() does now (the scale-free tuner since the switch)


def _paper(params: Iterable, **overrides: Any) -> torch.optim.Optimizer:
    from yellowfin import YellowFin

    return YellowFin.paper_variant(params, **overrides)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)  # YellowFin options applied on top of `base`
    base: Callable[..., torch.optim.Optimizer] = _reference  # base(params, **overrides) -> optimizer
    control_of: str | None = None  # a control: plain SGD replaying this variant's effective step

    @property
    def spec_name(self) -> str:
        return SPEC_PREFIX + self.name

    def build(self, params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
        return self.base(params, **self.overrides)  # never tuned: lr is ignored

    def spec(self) -> OptimizerSpec:
        if self.control_of is not None:
            return OptimizerSpec(self.spec_name, f"SGD with {self.control_of}'s step a/(1-mu)", CONTROL, plain_sgd,
                                 hyper={"momentum": 0.0}, replays=SPEC_PREFIX + self.control_of)
        hyper = {"variant": self.name, **self.overrides}
        # With average=True, or in primal-average form, the point handed out (evaluated) is the optimizer's average.
        return OptimizerSpec(self.spec_name, f"YellowFin {self.name}", UNTUNED, self.build, hyper=hyper,
                             records_tuner_trace=True, every_seed=True, averager=yellowfin_average_if_kept)


VARIANTS: dict[str, Variant] = {}
VARIANT_SPECS: dict[str, OptimizerSpec] = {}


def register_variant(variant: Variant) -> Variant:
    if not variant.name or not all(c.isalnum() or c in "._-" for c in variant.name):
        raise ValueError(f"variant name {variant.name!r}: use letters, digits, '.', '_' or '-' (it names files)")
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is registered already")
    if variant.control_of is not None and variant.control_of not in VARIANTS:
        raise ValueError(f"variant {variant.name!r} controls {variant.control_of!r}, which is not registered; "
                         f"known variants: {', '.join(VARIANTS)}")
    VARIANTS[variant.name] = variant
    VARIANT_SPECS[variant.spec_name] = variant.spec()
    return variant


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}") from None


# The scale-free variants measured before the relative clip existed run without it, whatever its default becomes.
_UNCLIPPED = {"relative_clip": math.inf}
# ... and every scale-free variant without a start, a growth cap, a distance hold, a momentum form or an average of its
# own runs as it was measured: with its rule's first move from before initial_distance existed, without the growth cap,
# the hold and the average, in heavy ball, whatever the defaults become.


# The plain metric's rule and clip as scale_free_dowg_clip_trigger_average measured them, handing out the average: what
# the later changes to the plain default were each measured on top of.
_DOWG_CLIP_TRIGGER_AVERAGE = {"tuner": "scale_free", "step_rule": "dowg", "relative_clip": 2.0,
                              "clip_trigger": outlier_trigger(0.99), "beta": 0.99, "average": True}
# Each metric's default as measured since the primal-average form became it (docs/tuner.md §20, §21), handing out the
# form's own average xbar (average=False): the plain metric's default until §24, Adam's metric's still.
_PLAIN_DEFAULT_FORM = {**_DOWG_CLIP_TRIGGER_AVERAGE, "average": False, "hold_distance_uphill": True,
                       "momentum_form": "primal_average", "clip_trigger": 2.0}
_ADAM_DEFAULT_FORM = {"tuner": "scale_free", "precondition": "adam", "step_rule": "dowg_neutral", "beta": 0.99,
                      "initial_distance": 1e-2, "momentum_form": "primal_average", "relative_clip": 2.0,
                      "clip_trigger": 2.0, "average": False}


def _pinned_as_measured(variant: Variant) -> Variant:
    overrides = variant.overrides
    if overrides.get("tuner") != "scale_free":
        return variant
    pinned = {"initial_distance": INITIAL_DISTANCE_BEFORE_THE_OPTION[overrides["step_rule"]], "growth_cap": False,
              "hold_distance_uphill": False, "momentum_form": "heavy_ball", "average": False}
    return dataclasses.replace(variant, overrides={**pinned, **overrides})


for _variant in (
    Variant(REFERENCE, "the authors' algorithm as the library implements it today (the faithful reference)"),
    Variant("default", "YellowFin() with the library's current defaults", base=_default),
    Variant("paper", "Algorithm 1 of the paper (YellowFin.paper_variant)", base=_paper),
    Variant("control", "plain SGD replaying the reference's effective step alpha/(1-mu)", control_of=REFERENCE),
    # Single changes of today's options, each alone on top of the reference.
    Variant("no_slow_start", "no 200-step ramp of the step size", overrides={"slow_start": False}),
    Variant("no_clipping", "no adaptive gradient clipping", overrides={"adaptive_clipping": False}),
    Variant("beta_0.99", "estimator memory of ~100 steps instead of ~1000", overrides={"beta": 0.99}),
    Variant("linear_curvature", "curvature range smoothed linearly, not in log space",
            overrides={"curvature_smoothing": "linear"}),
    # The scale-free tuner (docs/algorithm.md §8; docs/tuner.md): its secant rule at its two screened memories, its
    # DoG and DoWG rules, and their controls, each as measured (without the relative clip that came later).
    Variant("scale_free", "the scale-free tuner: DoG distance and secant step, SNR momentum (memory ~1000 steps)",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "step_rule": "secant"}),
    Variant("scale_free_beta_0.99", "the scale-free tuner with an estimator memory of ~100 steps",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "step_rule": "secant", "beta": 0.99}),
    Variant("control_scale_free_beta_0.99", "plain SGD replaying scale_free_beta_0.99's effective step alpha/(1-mu)",
            control_of="scale_free_beta_0.99"),
    Variant("scale_free_dog", "the scale-free tuner's DoG rule: effective step d / sqrt(sum ||g||^2), SNR momentum",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "step_rule": "dog", "beta": 0.99}),
    Variant("control_scale_free_dog", "plain SGD replaying scale_free_dog's effective step alpha/(1-mu)",
            control_of="scale_free_dog"),
    Variant("scale_free_dowg", "the DoWG rule: effective step d^2 / sqrt(sum d_t^2 ||g_t||^2), SNR momentum",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "step_rule": "dowg", "beta": 0.99}),
    Variant("scale_free_dowg_average", "scale_free_dowg, evaluated at its iterates' polynomial average",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "step_rule": "dowg", "beta": 0.99, "average": True}),
    # (it replays the runs with the average, whose trajectory is scale_free_dowg's bit for bit: those are the runs kept)
    Variant("control_scale_free_dowg", "plain SGD replaying scale_free_dowg's effective step alpha/(1-mu)",
            control_of="scale_free_dowg_average"),
    # The preconditioned tuner (docs/algorithm.md §9) as first measured: the DoG rule in Adam's metric. (Its control,
    # the same step in that metric without momentum, is the research harness's control_adam_metric_dog.)
    Variant("scale_free_adam", "the DoG rule in Adam's metric: tuned mu and step, three buffers per parameter",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dog", "beta": 0.99}),
    # The same two tuners handing out their iterates' polynomial average (average=True; docs/algorithm.md §10): the
    # trajectory is theirs, the evaluated point (the quadratic's exact loss, val and test) is the average.
    Variant("scale_free_dog_average", "scale_free_dog, evaluated at its iterates' polynomial average (t^8 weights)",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "step_rule": "dog", "beta": 0.99, "average": True}),
    Variant("scale_free_adam_average", "scale_free_adam, evaluated at its iterates' polynomial average (t^8 weights)",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dog", "beta": 0.99,
                       "average": True}),
    # The preconditioned tuner's default since (docs/tuner.md §12): the neutral DoWG rule.
    Variant("scale_free_adam_dowg_neutral", "scale_free_adam with DoWG's weights and DoG's neutral fixed point: "
            "effective step d^2 / sqrt(2 sum d_t^2 ||g_t||^2) in Adam's metric",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dowg_neutral",
                       "beta": 0.99}),
    Variant("scale_free_adam_dowg_neutral_average", "scale_free_adam_dowg_neutral, evaluated at its iterates' "
            "polynomial average (t^8 weights)",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dowg_neutral",
                       "beta": 0.99, "average": True}),
    # A diagnostic, not a candidate: a constant lr factor c > 1 on a neutral rule grows its step as a power of t
    # (c = 1.1: about t^0.27, docs/algorithm.md §8, "The lr multiplier"): is the autoencoder's gap the step's level?
    Variant("scale_free_adam_dowg_neutral_lr_1.1", "scale_free_adam_dowg_neutral with lr=1.1: its step grows "
            "about as t^0.27 where the gradients are noise (a diagnostic)",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dowg_neutral",
                       "beta": 0.99, "lr": 1.1}),
    Variant("scale_free_adam_beta_0.999", "scale_free_adam with a memory of ~1000 steps, which resolves a 10x "
            "smaller signal (a higher bound on mu)",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dog", "beta": 0.999}),
    # The relative clip of the update (relative_clip=2: the applied gradient's norm at most twice the running RMS;
    # docs/tuner.md §10), on both DoG rules, handing out the average, and their controls; as first measured, it acted
    # on every gradient above that level (clip_trigger=2).
    *(variant for rule in ("dowg", "dog") for variant in (
        Variant(f"scale_free_{rule}_clip_average",
                f"scale_free_{rule}_average, its update clipped at 2x the gradient's running RMS",
                overrides={"tuner": "scale_free", "step_rule": rule, "relative_clip": 2.0, "clip_trigger": 2.0,
                           "beta": 0.99, "average": True}),
        Variant(f"control_scale_free_{rule}_clip",
                f"plain SGD replaying scale_free_{rule}_clip_average's effective step",
                control_of=f"scale_free_{rule}_clip_average"),
    )),
    # The clip triggered only by an outlier against the memory, 1 / sqrt(1 - 0.99) = 10 times the running RMS (and
    # then cut to 2 times it, as before), and its control.
    Variant("scale_free_dowg_clip_trigger_average",
            "scale_free_dowg_clip_average, the clip acting only on a gradient above 10x the running RMS",
            overrides={"tuner": "scale_free", "step_rule": "dowg", "relative_clip": 2.0,
                       "clip_trigger": outlier_trigger(0.99), "beta": 0.99, "average": True}),
    Variant("control_scale_free_dowg_clip_trigger",
            "plain SGD replaying scale_free_dowg_clip_trigger_average's effective step",
            control_of="scale_free_dowg_clip_trigger_average"),
    # The default (scale_free_dowg_clip_trigger_average) with DoWG's step made neutral under noise (divided by sqrt 2,
    # docs/algorithm.md §8 step 7): the change measured alone in the plain metric.
    Variant("scale_free_dowg_neutral_clip_trigger_average",
            "scale_free_dowg_clip_trigger_average with DoWG's step divided by sqrt(2) (neutral under noise)",
            overrides={"tuner": "scale_free", "step_rule": "dowg_neutral", "relative_clip": 2.0,
                       "clip_trigger": outlier_trigger(0.99), "beta": 0.99, "average": True}),
    # Each metric's default with a first move ten times larger, r_eps = 1e-2 (initial_distance; docs/tuner.md §13):
    # the prototype's lead (the late step level is the same; the runs leave the start sooner).
    # (and 3e-2, to see how sensitive the runs are to the constant around it)
    *(variant for start in ("1e-2", "3e-2") for variant in (
        Variant(f"scale_free_dowg_clip_trigger_start_{start}_average",
                f"scale_free_dowg_clip_trigger_average with a first move of {start} (1 + ||x_0||) instead of 1e-3",
                overrides={"tuner": "scale_free", "step_rule": "dowg", "relative_clip": 2.0,
                           "clip_trigger": outlier_trigger(0.99), "beta": 0.99, "average": True,
                           "initial_distance": float(start)}),
        Variant(f"scale_free_adam_dowg_neutral_start_{start}", f"scale_free_adam_dowg_neutral with a first move of "
                f"{start} (1 + ||x_0||) in Adam's metric instead of 1e-3",
                overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dowg_neutral",
                           "beta": 0.99, "initial_distance": float(start)}),
    )),
    Variant("scale_free_adam_dowg_neutral_start_1e-2_average", "scale_free_adam_dowg_neutral_start_1e-2, evaluated at "
            "its iterates' polynomial average (t^8 weights)",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dowg_neutral",
                       "beta": 0.99, "initial_distance": 1e-2, "average": True}),
    # The neutral rule times c, with c^2 = 1.5 (lr=sqrt(1.5)): DoWG is the neutral rule times sqrt(2), whose step grows
    # without bound where the gradients are noise; times c it grows as t^((c^2-1)/(2-c^2)) = t there (docs/algorithm.md
    # §8, "The lr multiplier"; docs/tuner.md §14): between the neutral rule's fixed point and DoWG's runaway.
    Variant("scale_free_dowg_neutral_lr_1.22_clip_trigger_average",
            "scale_free_dowg_neutral_clip_trigger_average with lr=sqrt(1.5): its step grows about as t under noise",
            overrides={"tuner": "scale_free", "step_rule": "dowg_neutral", "relative_clip": 2.0,
                       "clip_trigger": outlier_trigger(0.99), "beta": 0.99, "average": True, "lr": math.sqrt(1.5)}),
    # The default with DoWG's effective step held to linear growth once the memory is full (growth_cap; docs/tuner.md
    # §15): the runaway near interpolation answered where DoWG's step outgrows t, and nowhere else.
    Variant("scale_free_dowg_clip_trigger_growth_cap_average",
            "scale_free_dowg_clip_trigger_average, its effective step growing at most as t from step 100 on",
            overrides={"tuner": "scale_free", "step_rule": "dowg", "relative_clip": 2.0,
                       "clip_trigger": outlier_trigger(0.99), "beta": 0.99, "average": True, "growth_cap": True}),
    Variant("control_scale_free_dowg_clip_trigger_growth_cap",
            "plain SGD replaying scale_free_dowg_clip_trigger_growth_cap_average's effective step",
            control_of="scale_free_dowg_clip_trigger_growth_cap_average"),
    # Each metric's default with the distance held where the loss rises along the way travelled
    # (hold_distance_uphill; docs/tuner.md §16): DoG's distance counts only while the run descends along it.
    Variant("scale_free_dowg_clip_trigger_hold_average",
            "scale_free_dowg_clip_trigger_average, its distance held while the running cos(g, x - x_0) is above 0",
            overrides={**_DOWG_CLIP_TRIGGER_AVERAGE, "hold_distance_uphill": True}),
    # ... and with the clip acting on every gradient above its level again (clip_trigger=2, as first measured): over
    # 20 seeds the default stays on the autoencoder's initial plateau on 2, this on none (docs/tuner.md §19).
    Variant("scale_free_dowg_clip_hold_average",
            "scale_free_dowg_clip_trigger_hold_average with the clip acting on every gradient above 2x the running RMS",
            overrides={**_DOWG_CLIP_TRIGGER_AVERAGE, "hold_distance_uphill": True, "clip_trigger": 2.0}),
    Variant("control_scale_free_dowg_clip_trigger_hold",
            "plain SGD replaying scale_free_dowg_clip_trigger_hold_average's effective step",
            control_of="scale_free_dowg_clip_trigger_hold_average"),
    # ... and the plain default (with the hold) from the first move 1e-2, which without the hold gained the ResNet-20
    # but ran away on 3 seeds of 20 near interpolation (docs/tuner.md §14): does the hold let DoWG take it?
    Variant("scale_free_dowg_clip_trigger_hold_start_1e-2_average",
            "scale_free_dowg_clip_trigger_hold_average with a first move of 1e-2 (1 + ||x_0||) instead of 1e-3",
            overrides={**_DOWG_CLIP_TRIGGER_AVERAGE, "hold_distance_uphill": True, "initial_distance": 1e-2}),
    Variant("scale_free_adam_dowg_neutral_start_1e-2_hold_average",
            "scale_free_adam_dowg_neutral_start_1e-2_average, its distance held while the running cos(g, x - x_0) is "
            "above 0",
            overrides={"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dowg_neutral",
                       "beta": 0.99, "initial_distance": 1e-2, "average": True, "hold_distance_uphill": True}),
    # The plain default's tuned (mu, alpha) in primal-averaging form (docs/tuner.md §18): the gradients taken near an
    # average of the plain-SGD sequence over the run instead of over the last 1 / (1 - mu) steps; that average is
    # the point handed out.
    Variant("scale_free_dowg_clip_trigger_hold_primal_average",
            "scale_free_dowg_clip_trigger_hold_average's (mu, alpha) in primal-averaging form (momentum_form)",
            overrides={**_DOWG_CLIP_TRIGGER_AVERAGE, "average": False, "hold_distance_uphill": True,
                       "momentum_form": "primal_average"}),
    Variant("scale_free_dowg_clip_hold_primal_average",
            "scale_free_dowg_clip_trigger_hold_primal_average with the clip acting on every gradient above 2x the "
            "running RMS",
            overrides=_PLAIN_DEFAULT_FORM),
    # Adam's metric's default (the neutral rule from 1e-2) in primal-averaging form, its signal read along the form's
    # lead w = z - xbar (three buffers: P, w, x_0), with the plain form's clip acting on every gradient above its level,
    # here of the metric's norms (docs/tuner.md §21).
    Variant("scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average",
            "scale_free_adam_dowg_neutral_start_1e-2's (mu, alpha) in primal-averaging form, its signal along the lead "
            "z - xbar, the clip at 2x the running RMS",
            overrides=_ADAM_DEFAULT_FORM),
    # Each metric's form handing out its gradient points' polynomial average (average=True) instead of the form's
    # average xbar (the plain metric's default since docs/tuner.md §24): the same trajectory; the form's feedback
    # through y shortens xbar's effective window by the factor 1 - mu, where y carries only z's fast fluctuation.
    Variant("scale_free_dowg_clip_hold_primal_average_average",
            "scale_free_dowg_clip_hold_primal_average, handing out its gradient points' polynomial average",
            overrides={**_PLAIN_DEFAULT_FORM, "average": True}),
    Variant("scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average_average",
            "scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average, handing out its gradient points' "
            "polynomial average",
            overrides={**_ADAM_DEFAULT_FORM, "average": True}),
    # Each metric's default with decoupled weight decay, in the primal-average form (the decay joins z's step at y,
    # as Schedule-Free AdamW decays) and in heavy ball (x shrinks), which groups with decoupled decay ran until then
    # (docs/tuner.md §22): lambda = 0.1 (AdamW's scale, large enough to move a run of this suite's length in Adam's
    # metric) and 1e-3 (for the plain metric while its shrink was lr alpha lambda, in loss units). Since §23 the plain
    # metric's lambda has AdamW's meaning too (tuning.decay_rate): its §22 runs were taken with the old unit.
    *(Variant(f"{name}_decay_{decay}", f"{name} with decoupled weight decay {decay}",
              overrides={**overrides, "weight_decay": float(decay), "decoupled_weight_decay": True})
      for decay in ("0.1", "1e-3") for name, overrides in (
          ("scale_free_dowg_clip_hold_primal_average", _PLAIN_DEFAULT_FORM),
          ("scale_free_dowg_clip_trigger_hold", {**_DOWG_CLIP_TRIGGER_AVERAGE, "average": False,
                                                 "hold_distance_uphill": True}),
          ("scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average", _ADAM_DEFAULT_FORM),
          ("scale_free_adam_dowg_neutral_start_1e-2",
           {"tuner": "scale_free", **_UNCLIPPED, "precondition": "adam", "step_rule": "dowg_neutral", "beta": 0.99,
            "initial_distance": 1e-2}))),
):
    register_variant(_pinned_as_measured(_variant))
DEFAULT_VARIANTS = (REFERENCE, "paper", "control")
