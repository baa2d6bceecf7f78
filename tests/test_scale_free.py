"""The scale-free tuner (``tuner="scale_free"``, docs/algorithm.md §8): its trajectory does not depend on the
loss scale, its three flavours agree, it reproduces the research prototype (benchmarks/tuner_screen.py's
FlatTuner, a variant for each of its step rules), and it saves, loads and skips like the
reference."""

import copy
import io
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

from yellowfin import YellowFin
from yellowfin.state import DEFAULT_INITIAL_DISTANCE, DEFAULT_RELATIVE_CLIP, SCALE_FREE_FIELDS, TunerSettings
from helpers import flat_state, host_reads_forbidden, run_with_holes

FLAVOURS = {"single_tensor": dict(foreach=False), "multi_tensor": {}, "compiled": dict(fused=True)}
# The tests that hold for the scale-free tuner in either metric (tests/test_preconditioned.py has the rest of Adam's).
METRICS = {"plain": dict(tuner="scale_free"), "adam": dict(tuner="scale_free", precondition="adam")}


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp_problem(seed=0):
    """A 5-16-1 tanh MLP in float64 and fixed regression data (64 rows, read 16 at a time in turn)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, dtype=torch.float64, generator=generator)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(64, 1, dtype=torch.float64, generator=generator)
    return model, x, y


def train(make_optimizer, steps=300, loss_scale=1.0, after_step=None):
    """The MLP trained with its loss multiplied by ``loss_scale``; returns (flat parameters, model, optimizer).
    ``after_step(opt)`` is called after every step."""
    model, x, y = mlp_problem()
    opt = make_optimizer(model.parameters())
    for step in range(steps):
        rows = (torch.arange(16) + 16 * step) % 64
        opt.zero_grad()
        (loss_scale * ((model(x[rows]) - y[rows]) ** 2).mean()).backward()
        opt.step()
        if after_step is not None:
            after_step(opt)
    return flat(model), model, opt


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


# (DoG's rule differs from DoWG's, the default, only in the scalar tuning that every flavour shares, which the next
# test checks flavour by flavour: its loss scale is tested on one flavour.)
@pytest.mark.parametrize("flavour, step_rule",
                         [(flavour, rule) for flavour in sorted(FLAVOURS) for rule in ("dowg", "secant")]
                         + [("single_tensor", "dog")])
def test_the_trajectory_does_not_depend_on_the_loss_scale(flavour, step_rule):
    def scale_free(params):
        return YellowFin(params, tuner="scale_free", step_rule=step_rule, **FLAVOURS[flavour])

    secant_steps = []

    def record(opt):
        secant_steps.append(opt.stats().get("secant_curvature", 0.0) > 0.0)

    unscaled, _, opt = train(scale_free, after_step=record)
    assert opt.stats()["step"] == 300
    if step_rule == "secant":  # the secant was measured on some steps and not on others: both of its steps in play
        assert 10 < sum(secant_steps) < 290
    else:  # the distance rules measure no secant (pass 1 leaves its sums out)
        assert "secant_curvature" not in opt.stats() and float(opt.tuner_state().secant_num_avg) == 0.0
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(scale_free, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


def test_the_default_as_a_user_builds_it_does_not_depend_on_the_loss_scale():
    # Issue 12's test, on YellowFin(params) with no option at all: 300 steps in float64, c from 1e-4 to 1e4.
    unscaled, _, opt = train(YellowFin)
    assert opt.param_groups[0]["tuner"] == "scale_free" and opt.stats()["step"] == 300
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(YellowFin, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale
    reference, _, _ = train(YellowFin.reference_variant)
    assert relative_difference(unscaled, reference) > 1e-3  # (a different tuner: the check above is not vacuous)


def test_the_relative_clip_acts_and_keeps_the_trajectory_free_of_the_loss_scale():
    # (a clip and trigger far tighter than the defaults, so that it acts on this small problem's gradients)
    def clipped(params):
        return YellowFin(params, tuner="scale_free", relative_clip=1.1, clip_trigger=1.1, foreach=False)

    unscaled, _, _ = train(clipped)
    unclipped, _, _ = train(lambda params: YellowFin(params, tuner="scale_free", relative_clip=math.inf))
    assert relative_difference(unscaled, unclipped) > 1e-3  # (it clipped)
    for loss_scale in (1e-4, 1e4):
        scaled, _, _ = train(clipped, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


def test_the_reference_trajectory_does_depend_on_the_loss_scale():
    # (what the test above would catch: the reference's units are the loss's)
    unscaled, _, _ = train(YellowFin.reference_variant, steps=50)
    scaled, _, _ = train(YellowFin.reference_variant, steps=50, loss_scale=1e2)
    assert relative_difference(scaled, unscaled) > 1e-3


# (dowg_capped: a memory of 5 steps, so that the growth cap holds from step 5 of these 25; DoWG holds its distance by
# default, and every case compares the running cosine the hold reads, a field of the tuner's state)
@pytest.mark.parametrize("options", [dict(step_rule="dog"), dict(step_rule="dowg"), dict(step_rule="dowg_neutral"),
                                     dict(step_rule="dowg", relative_clip=1.1, clip_trigger=1.1),
                                     dict(step_rule="dowg", beta=0.8, growth_cap=True)],
                         ids=["dog", "dowg", "dowg_neutral", "dowg_clipped", "dowg_capped"])
@pytest.mark.parametrize("flavour", ["multi_tensor", "compiled"])
def test_the_flavours_give_the_single_tensor_numbers(flavour, options):
    # Frozen layer, a 0-dim parameter, two groups with different lr, gradients missing on some steps, a NaN step.
    params_ref, opt_ref = run_with_holes(steps=25, nan_at=4, foreach=False, tuner="scale_free", **options)
    params, opt = run_with_holes(steps=25, nan_at=4, tuner="scale_free", **options, **FLAVOURS[flavour])
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["step"] == 24
    for a, b in zip(params_ref, params):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=0.0)
    for a, b in zip(flat_state(opt_ref), flat_state(opt)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("options, variant", [
    (dict(step_rule="dog", relative_clip=math.inf), "snr_dog_start_1e-3"),
    (dict(step_rule="dowg", relative_clip=math.inf), "snr_dowg_start_1e-3"),
    (dict(step_rule="dowg", relative_clip=math.inf, initial_distance=1e-2), "snr_dowg_start_1e-2"),
    (dict(step_rule="secant", relative_clip=math.inf), "ds_memory_0.99"),
    # (a clip and trigger tighter than the defaults, so that it acts on this small problem's gradients)
    (dict(step_rule="dog", relative_clip=1.1, clip_trigger=1.1), "snr_dog_update_clip_2"),
    (dict(step_rule="dowg", relative_clip=1.1, clip_trigger=1.1), "snr_dowg_update_clip_2"),
    (dict(step_rule="dowg", relative_clip=1.1, clip_trigger=1.3), "snr_dowg_update_clip_2_trigger_10"),
    (dict(step_rule="dowg", relative_clip=1.1, clip_trigger=1.3, growth_cap=True),
     "snr_dowg_update_clip_2_trigger_10_linear_100"),
])
def test_matches_the_flat_prototype(options, variant):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import VARIANTS, FlatTuner

    # (the prototype is heavy ball; the library's default memory for this tuner is 0.99, the prototype variants')
    library, _, opt = train(lambda params: YellowFin(params, tuner="scale_free", foreach=False,
                                                     momentum_form="heavy_ball", **options))
    clip = {"relative_clip": options["relative_clip"], "clip_trigger": options.get("clip_trigger")}
    prototype, _, flat_tuner = train(lambda params: FlatTuner(params, **{**VARIANTS[variant], **clip}))
    # The same algorithm; the library computes from scalars what the prototype computes from flat vectors
    # (the secant as P - <g, lr v>), so rounding differs in the last digits and grows a little along the way.
    assert relative_difference(library, prototype) < 1e-7
    assert opt.stats()["alpha"] == pytest.approx(flat_tuner.trace["alpha"][-1], rel=1e-6)
    assert opt.stats()["mu"] == pytest.approx(flat_tuner.trace["mu"][-1], rel=1e-6)
    if math.isfinite(options["relative_clip"]):
        assert flat_tuner.clipped_steps > 0  # (so that the clip itself is compared)
    if options.get("growth_cap"):  # (and the cap: it acted)
        uncapped, _, _ = train(lambda params: YellowFin(params, tuner="scale_free", foreach=False,
                                                        **{**options, "growth_cap": False}))
        assert relative_difference(library, uncapped) > 1e-5  # (a hundred times the match above)


@pytest.mark.parametrize("variant", ["snr_dowg", "snr_dowg_update_clip_2_trigger_10"])
def test_the_flat_prototype_applies_only_its_own_clip(variant):
    # The prototype reads the reference's estimators from tuning.tune_step and applies its c.grad_scale; with the
    # library's default tuner there, the library's relative clip acted on every variant too, and twice where a
    # variant clips (docs/tuner.md §15). An outlier a hundred times the usual gradient, after 150 ordinary ones:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import VARIANTS, FlatTuner

    param = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    opt = FlatTuner([param], **VARIANTS[variant])
    generator = torch.Generator().manual_seed(0)
    for step in range(151):
        before = opt.velocity.clone()
        param.grad = torch.randn(8, dtype=torch.float64, generator=generator) * (100.0 if step == 150 else 1.0)
        opt.step()
    applied = (opt.velocity - opt.trace["mu"][-1] * before) / param.grad
    own_clip = opt.update_factor  # (1 where the variant has no clip or it did not act)
    assert (own_clip < 1.0) == ("clip" in variant)
    torch.testing.assert_close(applied, torch.full_like(applied, own_clip), rtol=1e-12, atol=0.0)


def test_the_adam_metric_prototype_does_not_depend_on_the_loss_scale_either():
    # Issue 13's first screen (docs/tuner.md §7): the same rule in Adam's metric keeps every estimate in
    # units that cancel, including Adam's epsilon (relative to the metric's mean) and DoG's start.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import AdamMetricTuner

    unscaled, _, _ = train(AdamMetricTuner)
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(AdamMetricTuner, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


def effective_steps_on_a_random_walk(steps=1000, at=(100, 1000), **options):
    """The effective step alpha / (1 - mu) at the steps ``at`` of a run on gradients of pure noise (the loss
    <xi_t, x> with a fresh xi_t ~ N(0, I) each step: nothing to follow, so the distance from x_0 grows as a random
    walk's); float64, 1000 coordinates, so that ||x - x_0|| is close to its expectation. In heavy ball unless
    ``options`` name a form (the rules' growth was measured so)."""
    x = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([x], **{"momentum_form": "heavy_ball", **options})
    generator = torch.Generator().manual_seed(0)
    effective = {}
    for step in range(1, steps + 1):
        x.grad = torch.randn(1000, dtype=torch.float64, generator=generator)
        opt.step()
        if step in at:
            effective[step] = opt.stats()["alpha"] / (1.0 - opt.stats()["mu"])
    return [effective[step] for step in at]


# DoG's step d_t / sqrt(t G) reproduces itself when d_t grows as sqrt(t), and so does DoWG's divided by sqrt(2)
# (sum_s d_s^2 = t d_t^2 / 2): noise alone neither grows nor shrinks them. Undivided, DoWG's grows by about
# sqrt(2) each time it is measured, as it does in Adam's metric, where nothing in the gradients checks it.
@pytest.mark.parametrize("options", [dict(step_rule="dog"), dict(step_rule="dowg_neutral"),
                                     dict(step_rule="dog", precondition="adam"),
                                     dict(step_rule="dowg_neutral", precondition="adam")],
                         ids=["dog", "dowg_neutral", "adam-dog", "adam-dowg_neutral"])
def test_noise_alone_leaves_the_neutral_rules_step_where_it_is(options):
    early, late = effective_steps_on_a_random_walk(tuner="scale_free", relative_clip=math.inf, **options)
    assert 0.9 < late / early < 1.1


# A constant lr multiplier c turns the neutral fixed point into a power law alpha ~ t^gamma: with the walk's
# d_t^2 ~ c^2 t^(2 gamma + 1) / (2 gamma + 1), DoG's rule holds gamma = (c^2 - 1) / 2 and the neutral DoWG rule
# gamma = (c^2 - 1) / (2 - c^2) (docs/algorithm.md §8, "The lr multiplier").
@pytest.mark.parametrize("step_rule, exponent", [("dog", (0.25 - 1.0) / 2.0), ("dowg_neutral", (0.25 - 1.0) / 1.75)])
def test_a_multiplier_below_one_anneals_the_neutral_rules_step_as_a_power_law(step_rule, exponent):
    early, late = effective_steps_on_a_random_walk(steps=3000, at=(300, 3000), tuner="scale_free", lr=0.5,
                                                   step_rule=step_rule, relative_clip=math.inf)
    assert math.log10(late / early) == pytest.approx(exponent, abs=0.02)


def noise_about_the_start(steps=1000, **options):
    """The tuner's record after a run on the noisy quadratic 0.5 ||x||^2 + <xi_t, x> (a fresh xi_t ~ N(0, I) each
    step) started at its minimum, x_0 = 0: every move is uphill, and the distance from x_0 only the noise's."""
    x = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([x], **options)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x.grad = x.detach() + torch.randn(1000, dtype=torch.float64, generator=generator)
        opt.step()
    return opt.stats()


# Started at the minimum, the gradient leans on average toward x - x_0 (its mean is x itself), so the running cosine
# is positive and the hold keeps the distance near its start. DoWG alone lets the noise grow it, and its step with
# it, tenfold and more; the neutral rule (Adam's metric's default) holds its step under noise, so its distance grows
# only as a random walk's, and the hold saves less of it (docs/tuner.md §16).
@pytest.mark.parametrize("metric, rule, most", [("plain", "dowg", 0.2), ("adam", "dowg_neutral", 0.6)])
def test_the_hold_keeps_the_distance_where_every_move_climbs(metric, rule, most):
    options = dict(METRICS[metric], step_rule=rule)
    free = noise_about_the_start(**options, hold_distance_uphill=False)
    held = noise_about_the_start(**options, hold_distance_uphill=True)
    assert held["climb"] > 0.0 and free["climb"] > 0.0  # (kept by every scale-free tuner, read with the option)
    assert held["distance"] < most * free["distance"]
    assert held["alpha"] < most * free["alpha"]


def test_the_hold_matches_the_flat_prototype_where_it_acts():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import VARIANTS, FlatTuner

    def run(make_optimizer):
        x = torch.zeros(1000, dtype=torch.float64, requires_grad=True)
        opt = make_optimizer([x])
        generator = torch.Generator().manual_seed(0)
        for _ in range(300):
            x.grad = x.detach() + torch.randn(1000, dtype=torch.float64, generator=generator)
            opt.step()
        return x.detach().clone(), opt

    library, opt = run(lambda params: YellowFin(params, step_rule="dowg", hold_distance_uphill=True, foreach=False,
                                                momentum_form="heavy_ball"))
    prototype, flat_tuner = run(lambda params: FlatTuner(params,
                                                         **VARIANTS["snr_dowg_update_clip_2_trigger_10_descent"]))
    assert relative_difference(library, prototype) < 1e-7
    assert opt.stats()["distance"] == pytest.approx(flat_tuner.distance, rel=1e-7)
    free, _ = run(lambda params: YellowFin(params, step_rule="dowg", hold_distance_uphill=False, foreach=False,
                                           momentum_form="heavy_ball"))
    assert relative_difference(library, free) > 1e-2  # (it held)


def test_the_held_trajectory_does_not_depend_on_the_loss_scale():
    # (the cosine is a ratio of a pairing to its bound: no scale survives; on the noisy quadratic, where it acts)
    def held(loss_scale):
        x = torch.zeros(100, dtype=torch.float64, requires_grad=True)
        opt = YellowFin([x], hold_distance_uphill=True)
        generator = torch.Generator().manual_seed(0)
        for _ in range(300):
            x.grad = loss_scale * (x.detach() + torch.randn(100, dtype=torch.float64, generator=generator))
            opt.step()
        return x.detach().clone()

    unscaled = held(1.0)
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        assert relative_difference(held(loss_scale), unscaled) < 1e-6, loss_scale


def test_noise_alone_runs_dowgs_step_away():
    early, late = effective_steps_on_a_random_walk(tuner="scale_free", step_rule="dowg", relative_clip=math.inf,
                                                   hold_distance_uphill=False)
    assert late / early > 1e3


# The distance hold answers a run that climbs; pure noise, with no loss to climb, has a running cosine of mean 0, so
# the hold acts on about half the steps: it slows DoWG's growth there but does not stop it (a limit, docs/tuner.md §16).
def test_the_hold_slows_dowgs_growth_on_noise_alone_but_does_not_stop_it():
    early, late = effective_steps_on_a_random_walk(tuner="scale_free", step_rule="dowg", relative_clip=math.inf)
    assert 10.0 < late / early < 1e3


# With the growth cap the step grows at most in proportion to t once the memory is full (step 100 at beta 0.99):
# from step 100 to 1000, ten times at most, and on noise alone exactly that, since DoWG outgrows t there.
def test_the_growth_cap_holds_dowgs_step_on_noise_to_linear_growth():
    early, late = effective_steps_on_a_random_walk(tuner="scale_free", step_rule="dowg", relative_clip=math.inf,
                                                   growth_cap=True, hold_distance_uphill=False)
    assert late / early == pytest.approx(10.0, rel=1e-9)


# Where the step grows more slowly than t, the cap acts only on the step's fluctuations (a rise of more than 1% from
# step 100 to 101 is one): the neutral rule's constant step under noise ends within 1e-3 of where it ends without it.
def test_the_growth_cap_leaves_a_step_that_grows_more_slowly_than_t_nearly_alone():
    free = effective_steps_on_a_random_walk(tuner="scale_free", step_rule="dowg_neutral", relative_clip=math.inf)
    capped = effective_steps_on_a_random_walk(tuner="scale_free", step_rule="dowg_neutral", relative_clip=math.inf,
                                              growth_cap=True)
    assert capped[0] == free[0]  # (the bound starts at step 100)
    assert capped[1] == pytest.approx(free[1], rel=1e-3)


def prototype_anchor_steps(make_tuner, curvature, steps, at):
    """The research prototype's effective steps on benchmarks/anchor_annealing.py's noisy quadratic."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from anchor_annealing import effective_steps

    assert max(at) == steps
    return effective_steps(make_tuner, curvature, at)


def anchor_tuners():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import ADAM_METRIC_VARIANTS, VARIANTS, AdamMetricTuner, FlatTuner

    return {"plain": lambda params: FlatTuner(params, **VARIANTS["snr_anchor_uniform"]),
            "plain-without-momentum": lambda params: FlatTuner(params, **VARIANTS["snr_anchor_uniform"],
                                                               without_momentum=True),
            "adam": lambda params: AdamMetricTuner(params, **ADAM_METRIC_VARIANTS["adam_metric_anchor_uniform"])}


# DoG measured about the iterates' running average (docs/tuner.md §13): its denominator is what the squared
# distance to the average would be under a random walk, so noise alone leaves the step where it is ...
@pytest.mark.parametrize("flavour", ["plain", "adam"])
def test_noise_alone_leaves_the_anchor_rules_step_where_it_is(flavour):
    early, late = prototype_anchor_steps(anchor_tuners()[flavour], 0.0, 1000, (100, 1000))
    assert 0.9 < late / early < 1.1


# ... and near a minimum, where the iterate returns to its average, it anneals the step as c / (h t), the schedule
# of the O(1/t) rate, which needs c > 1/2 (measured: c about 2.2 at step 3000, falling slowly towards 2); DoG's own
# rule anneals as 1 / sqrt(t) there, 1.7 times from step 1000 to 3000 where 1/t is 3 times.
def test_near_a_minimum_the_anchor_rule_anneals_as_one_over_t():
    curvature = 1.0
    middle, late = prototype_anchor_steps(anchor_tuners()["plain-without-momentum"], curvature, 3000, (1000, 3000))
    assert middle / late > 2.5
    assert 0.5 < late * 3000 * curvature < 4.0


# The first move is r (1 + ||x_0||), r = initial_distance: by default 1e-3, 1e-2 for the neutral DoWG rule, 1e-6 for
# the secant rule; any r given.
@pytest.mark.parametrize("step_rule, start, options", [
    ("dog", 1e-3, {}), ("dowg", 1e-3, {}), ("dowg_neutral", 1e-2, {}), ("secant", 1e-6, {}),
    ("dog", 2e-2, {"initial_distance": 2e-2}), ("dowg", 2e-2, {"initial_distance": 2e-2}),
    ("dowg_neutral", 1e-4, {"initial_distance": 1e-4}), ("secant", 1e-3, {"initial_distance": 1e-3}),
], ids=str)
def test_the_first_step_moves_dogs_initial_distance_without_momentum(step_rule, start, options):
    model, x, y = mlp_problem()
    before = flat(model)
    opt = YellowFin(model.parameters(), tuner="scale_free", step_rule=step_rule, **options)
    assert opt.param_groups[0]["initial_distance"] == start
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    moved = float((flat(model) - before).norm())
    assert moved == pytest.approx(start * (1.0 + float(before.norm())), rel=1e-12)
    assert opt.stats()["mu"] == 0.0 and opt.stats()["distance"] == pytest.approx(moved, rel=1e-12)


# ||x_0|| is measured once per x_0 buffer and kept outside the state (the passes no longer read x_0 for it): after a
# first step that is skipped, an x_0 replaced through a checkpoint, a copy or a pickle must be the one the start
# reads. Here x_0 becomes (1 + 1e-4) x, so that ||x - x_0|| stays below the start and the start alone sets the step.
@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("carry", ["load_state_dict", "deepcopy", "pickle"])
def test_the_start_reads_the_initial_parameters_that_the_state_holds_now(metric, carry):
    model, x, y = mlp_problem()
    opt = YellowFin(model.parameters(), **METRICS[metric])
    ((model(x) - y) ** 2).mean().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()  # skipped: x_0 is kept (and its norm measured), the tuner has not started
    assert opt.stats()["skipped_steps"] == 1
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["initial_param"].mul_(1.0 + 1e-4)
    saved = copy.deepcopy(opt.state_dict())
    if carry == "load_state_dict":
        opt.load_state_dict(copy.deepcopy(saved))  # (a loaded state holds the dict's own tensors)
    elif carry == "deepcopy":
        model, opt = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        model, opt = torch.load(buffer, weights_only=False)
    # The same state loaded into an optimizer that has measured nothing yet.
    twin = copy.deepcopy(model)
    twin_opt = YellowFin(twin.parameters(), **METRICS[metric])
    twin_opt.load_state_dict(saved)
    start = flat(model)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step()
    assert torch.equal(flat(model), flat(twin))
    if metric == "plain":  # (in Adam's metric the start is carried into the metric's units as well)
        moved = float((flat(model) - start).norm())
        assert moved == pytest.approx(1e-3 * (1.0 + (1.0 + 1e-4) * float(start.norm())), rel=1e-12)


STABILITY_CASES = {**METRICS, "plain_dog": dict(tuner="scale_free", step_rule="dog")}


@pytest.mark.parametrize("case", sorted(STABILITY_CASES))
def test_it_stays_stable_when_trained_to_zero_loss(case):
    # A separable problem (256 points labelled by a linear teacher): near the interpolating solution the loss
    # flattens along the step while the few batches that still hold a misclassified example give large
    # gradients. Without DoG's bound on the effective step the tuner diverged here within 400 steps on every
    # seed (benchmarks/interpolation.py); the reference and momentum SGD train it to zero loss.
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(256, 20, generator=generator)
        labels = (inputs @ torch.randn(20, 4, generator=generator)).argmax(1)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 4))
        opt = YellowFin(model.parameters(), **STABILITY_CASES[case])
        worst = 0.0
        for step in range(600):
            rows = torch.randint(0, 256, (32,), generator=generator)
            loss = nn.functional.cross_entropy(model(inputs[rows]), labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= 300:
                worst = max(worst, float(loss.detach())) if torch.isfinite(loss) else float("inf")
        with torch.no_grad():
            final = float(nn.functional.cross_entropy(model(inputs), labels))
        assert worst < 1.0 and final < 0.05, (seed, worst, final)


def test_stats_report_the_distance_and_the_secant_curvature():
    _, _, opt = train(lambda params: YellowFin(params, tuner="scale_free", step_rule="secant"), steps=40)
    stats = opt.stats()
    assert stats["distance"] > 0.0 and stats["secant_curvature"] > 0.0
    _, _, default = train(YellowFin, steps=40)  # the library's default: the scale-free tuner's DoWG rule
    assert default.param_groups[0]["tuner"] == "scale_free" and default.param_groups[0]["step_rule"] == "dowg"
    # (its step does not read a secant, so none is measured: pass 1 does not read the momentum for it)
    assert default.stats()["distance"] > 0.0 and "secant_curvature" not in default.stats()
    _, _, reference = train(YellowFin.reference_variant, steps=2)
    assert "distance" not in reference.stats() and "secant_curvature" not in reference.stats()


def test_only_the_scale_free_tuner_keeps_the_initial_parameters():
    _, model, opt = train(lambda params: YellowFin(params, tuner="scale_free"), steps=3)
    _, default_model, default = train(YellowFin, steps=3)  # (the default is the scale-free tuner: it pays too)
    _, reference_model, reference = train(YellowFin.reference_variant, steps=3)
    assert all("initial_param" in opt.state[p] for p in model.parameters())
    assert all("initial_param" in default.state[p] for p in default_model.parameters())
    assert not any("initial_param" in reference.state[p] for p in reference_model.parameters())


# (each metric's default is the tuned pair in primal-averaging form, whose passes are its own, tests/test_primal_average.py;
# and heavy ball in each metric)
UPDATE_FORMS = {**METRICS, **{f"{metric}_heavy_ball": dict(options, momentum_form="heavy_ball")
                              for metric, options in METRICS.items()}}


@pytest.mark.parametrize("form", sorted(UPDATE_FORMS))
@pytest.mark.parametrize("flavour", ["single_tensor", "multi_tensor"])
def test_decoupled_weight_decay_does_not_depend_on_the_loss_scale(flavour, form):
    # AdamW's lambda: the shrink is lr lambda times the update's size per coordinate, in either metric and form, so
    # a loss scaled by c leaves it alone (with the shrink lr alpha lambda, c = 1e-4 shrank the plain metric's
    # parameters 1e4 times harder, and a first step on a small gradient could wipe them out).
    def decayed(params):
        return YellowFin(params, weight_decay=0.1, decoupled_weight_decay=True, **UPDATE_FORMS[form],
                         **FLAVOURS[flavour])

    unscaled, _, opt = train(decayed)
    undecayed, _, _ = train(lambda params: YellowFin(params, **UPDATE_FORMS[form], **FLAVOURS[flavour]))
    assert relative_difference(unscaled, undecayed) > 1e-4  # (the decay acted)
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(decayed, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


@pytest.mark.parametrize("form", sorted(UPDATE_FORMS))
@pytest.mark.parametrize("flavour", ["single_tensor", "multi_tensor"])
def test_a_step_never_reads_tensors_on_the_host(flavour, form):
    model, x, y = mlp_problem()
    opt = YellowFin(model.parameters(), **UPDATE_FORMS[form], **FLAVOURS[flavour])
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with host_reads_forbidden():
            opt.step()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("form", sorted(UPDATE_FORMS))
def test_a_state_dict_round_trip_continues_identically(form, flavour):
    # (torch's load_state_dict casts a fused group's "step" to float32; the preconditioned tuner's counts, which
    # debias its metric, must stay float64 for the resumed run to take the same steps)
    def scale_free(params):
        return YellowFin(params, **UPDATE_FORMS[form], **FLAVOURS[flavour])

    expected, _, _ = train(scale_free, steps=80)

    model, x, y = mlp_problem()
    opt = scale_free(model.parameters())
    for step in range(80):
        rows = (torch.arange(16) + 16 * step) % 64
        if step == 40:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=True)
            model, _, _ = mlp_problem(seed=7)  # other weights, overwritten by the checkpoint
            model.load_state_dict(checkpoint["model"])
            opt = scale_free(model.parameters())
            opt.load_state_dict(checkpoint["opt"])
            assert all(state["step"].dtype == torch.float64 for state in opt.state.values() if "step" in state)
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    assert torch.equal(flat(model), expected)


# The group options that came with the scale-free tuner or after it (a checkpoint written before them names none).
OPTIONS_SINCE_THE_SCALE_FREE_TUNER = ("tuner", "step_rule", "precondition", "relative_clip", "clip_trigger",
                                      "initial_distance", "growth_cap", "hold_distance_uphill", "average",
                                      "momentum_form")


@pytest.mark.parametrize("load_into", ["reference_variant", "default"])
def test_a_checkpoint_from_before_the_scale_free_tuner_loads(load_into):
    # A checkpoint as the library wrote it before the scale-free tuner (and the preconditioned one) existed: its
    # tuners hold none of their fields (nor the staleness, which came after), its groups none of their options, and
    # it ran the reference, the only tuner then. As for torch's optimizers the saved groups' options win, so it loads
    # as the reference and continues the reference's run into either optimizer, the default (scale-free) one too.
    expected, _, _ = train(YellowFin.reference_variant, steps=10)
    model, x, y = mlp_problem()
    opt = YellowFin.reference_variant(model.parameters())
    for step in range(10):
        if step == 5:
            saved, before = opt.state_dict(), flat_state(opt)
            old = copy.deepcopy(saved)  # (a state_dict shares the optimizer's tensors)
            for tuner in old["tuners"]:
                for name in (*SCALE_FREE_FIELDS, "staleness", "last_momentum"):
                    del tuner[name]
            for group in old["param_groups"]:
                for name in OPTIONS_SINCE_THE_SCALE_FREE_TUNER:
                    del group[name]
            assert not any("initial_param" in state for state in old["state"].values())
            if load_into == "default":
                opt = YellowFin(model.parameters())
                assert opt.param_groups[0]["tuner"] == "scale_free"  # (what it would run without the checkpoint)
            else:
                opt = YellowFin.reference_variant(model.parameters())
            opt.load_state_dict(old)
            group = opt.param_groups[0]
            assert group["tuner"] == "reference" and group["beta"] == 0.999
            assert all(group[name] is None
                       for name in ("step_rule", "precondition", "relative_clip", "clip_trigger", "initial_distance"))
            assert group["average"] is False and group["momentum_form"] == "heavy_ball"
            assert YellowFin._settings(group) == YellowFin._settings(saved["param_groups"][0])
            after = flat_state(opt)  # (the reference's scale-free fields and staleness are zeros, as restored)
            assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
        rows = (torch.arange(16) + 16 * step) % 64
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    assert not any("initial_param" in opt.state[p] for p in model.parameters())  # (it stepped as the reference)
    assert "distance" not in opt.stats()
    assert torch.equal(flat(model), expected)


@pytest.mark.parametrize("field", ["grad_sq_sum", "staleness", "climb_avg"])
def test_a_scale_free_checkpoint_from_before_a_field_loads_with_it_at_zero(field):
    # (DoG's sum then restarts; a checkpoint from before the staleness was synchronous; the running cosine restarts)
    # (in heavy ball, which runs under staleness)
    _, model, opt = train(lambda params: YellowFin(params, tuner="scale_free", momentum_form="heavy_ball"), steps=5)
    opt.set_staleness(2.0)
    old = opt.state_dict()
    for tuner in old["tuners"]:
        del tuner[field]
    restored = YellowFin(model.parameters(), tuner="scale_free")
    restored.load_state_dict(old)
    assert getattr(restored.tuner_state(), field) == 0.0
    assert restored.tuner_state().distance == opt.tuner_state().distance


def everything_but_the_skip_count(opt, model) -> list[torch.Tensor]:
    """Copies of the optimizer's tuner state (its skip count zeroed) and of every parameter's state."""
    tuner = opt.tuner_state().replace(skipped_steps=torch.zeros((), dtype=torch.float64))
    tensors = (*tuner.as_dict().values(), *(t for p in model.parameters() for t in opt.state[p].values()))
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_a_non_finite_gradient_changes_nothing(metric):
    model, x, y = mlp_problem()
    opt = YellowFin(model.parameters(), **METRICS[metric])
    for step in range(10):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    before_state, before_params = everything_but_the_skip_count(opt, model), flat(model)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.stats()["skipped_steps"] == 1
    assert torch.equal(flat(model), before_params)
    for a, b in zip(before_state, everything_but_the_skip_count(opt, model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_per_group_tuning_tunes_each_group_in_its_own_units(metric):
    def per_group(params):
        params = list(params)
        return YellowFin([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], **METRICS[metric],
                         per_group_tuning=True)

    unscaled, _, opt = train(per_group, steps=100)
    scaled, _, _ = train(per_group, steps=100, loss_scale=1e3)
    assert relative_difference(scaled, unscaled) < 1e-6
    records = opt.stats()
    assert len(records) == 2 and all(r["distance"] > 0.0 for r in records)
    assert records[0]["distance"] != records[1]["distance"]


def test_groups_may_choose_their_tuner_only_with_per_group_tuning():
    model, _, _ = mlp_problem()
    params = list(model.parameters())
    # (the default, scale-free, for the first group; the second chooses the reference)
    groups = [{"params": params[:2]}, {"params": params[2:], "tuner": "reference"}]
    opt = YellowFin(groups, per_group_tuning=True)
    assert [group["tuner"] for group in opt.param_groups] == ["scale_free", "reference"]
    assert "distance" in opt.stats(0) and "distance" not in opt.stats(1)
    with pytest.raises(ValueError, match="share its settings"):
        YellowFin(groups)
    # and the other way round: a scale-free group among the reference's
    groups = [{"params": params[:2], "tuner": "scale_free"}, {"params": params[2:]}]
    opt = YellowFin(groups, tuner="reference", per_group_tuning=True)
    assert [group["tuner"] for group in opt.param_groups] == ["scale_free", "reference"]
    assert "distance" in opt.stats(0) and "distance" not in opt.stats(1)
    with pytest.raises(ValueError, match="share its settings"):
        YellowFin(groups, tuner="reference")


@pytest.mark.parametrize("options", [
    dict(nesterov=True), dict(update_first=True), dict(smooth_tuned=True), dict(curvature_smoothing="linear"),
])
@pytest.mark.parametrize("tuner", [dict(tuner="scale_free"), {}], ids=["scale_free", "default"])
def test_options_of_the_reference_alone_are_refused(options, tuner):
    # (by the scale-free tuner, the default too; the reference takes them)
    model, _, _ = mlp_problem()
    [(name, value)] = options.items()
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} is an option of tuner='reference'")):
        YellowFin(model.parameters(), **tuner, **options)
    assert YellowFin.reference_variant(model.parameters(), **options).param_groups[0][name] == value


def test_nesterov_is_refused_in_an_added_group_too():
    model, _, _ = mlp_problem()
    params = list(model.parameters())
    opt = YellowFin(params[:2], tuner="scale_free")
    with pytest.raises(ValueError, match="nesterov"):
        opt.add_param_group({"params": params[2:], "nesterov": True})


def test_the_step_rule_and_clip_are_the_scale_free_tuners_and_each_group_names_what_it_runs():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    plain = YellowFin([p], tuner="scale_free")
    default = YellowFin([p])  # the library's default is the scale-free tuner: its group names the same
    assert plain.param_groups[0]["step_rule"] == "dowg"  # the plain metric's default
    adam = YellowFin([p], tuner="scale_free", precondition="adam")
    assert adam.param_groups[0]["step_rule"] == "dowg_neutral"  # Adam's metric's
    assert YellowFin([p], tuner="reference").param_groups[0]["step_rule"] is None  # the reference has none
    assert YellowFin.reference_variant([p]).param_groups[0]["step_rule"] is None
    assert plain.defaults["step_rule"] is None  # (so that a group in the other metric picks its own default)
    mixed = YellowFin([{"params": [p], "tuner": "reference"}, {"params": [q]}], per_group_tuning=True)
    assert [group["step_rule"] for group in mixed.param_groups] == [None, "dowg"]
    assert plain.state_dict()["param_groups"][0]["step_rule"] == "dowg"
    assert plain.param_groups[0]["relative_clip"] == DEFAULT_RELATIVE_CLIP
    # (in Adam's metric its default form takes the clip, 2 in the metric's norms; heavy ball there runs without)
    assert YellowFin([p], tuner="scale_free", precondition="adam").param_groups[0]["relative_clip"] == 2.0
    assert YellowFin([p], precondition="adam", momentum_form="heavy_ball").param_groups[0]["relative_clip"] == math.inf
    assert YellowFin([p], tuner="reference").param_groups[0]["relative_clip"] is None
    assert YellowFin([p], relative_clip=1.5).param_groups[0]["relative_clip"] == 1.5  # (the default takes it)
    with pytest.raises(ValueError, match="relative_clip"):
        YellowFin([p], tuner="reference", relative_clip=2.0)  # the reference clips its own way
    with pytest.raises(ValueError, match="relative_clip"):
        YellowFin.reference_variant([p], relative_clip=2.0)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="relative_clip"):
            YellowFin([p], tuner="scale_free", relative_clip=bad)
    with pytest.raises(TypeError, match="relative_clip"):
        YellowFin([p], tuner="scale_free", relative_clip="2")
    # The trigger: in the primal-average form (the plain default) the clip's own level; in heavy ball
    # 1 / sqrt(1 - beta), the group's memory.
    assert plain.param_groups[0]["momentum_form"] == "primal_average" and plain.param_groups[0]["clip_trigger"] == 2.0
    assert YellowFin([p], relative_clip=1.5).param_groups[0]["clip_trigger"] == 1.5
    heavy_ball = YellowFin([p], tuner="scale_free", momentum_form="heavy_ball")
    assert heavy_ball.param_groups[0]["clip_trigger"] == pytest.approx(10.0)
    assert YellowFin([p], tuner="scale_free", beta=0.9, momentum_form="heavy_ball").param_groups[0][
        "clip_trigger"] == pytest.approx(10**0.5)
    assert YellowFin([p], relative_clip=math.inf).param_groups[0]["clip_trigger"] == math.inf
    assert YellowFin([p], tuner="reference").param_groups[0]["clip_trigger"] is None
    for name in ("tuner", "step_rule", "relative_clip", "clip_trigger", "initial_distance"):
        assert default.param_groups[0][name] == plain.param_groups[0][name], name
    assert YellowFin._settings(default.param_groups[0]) == YellowFin._settings(plain.param_groups[0])
    assert YellowFin([p], step_rule="dog").param_groups[0]["step_rule"] == "dog"  # (the default takes one)
    with pytest.raises(ValueError, match="step_rule"):
        YellowFin([p], tuner="reference", step_rule="dog")  # the reference has no step rule to choose
    with pytest.raises(ValueError, match="step_rule"):
        YellowFin([p], tuner="scale_free", step_rule="secants")
    # The first move: each rule's default, resolved and named by the group; the reference has none.
    assert plain.param_groups[0]["initial_distance"] == DEFAULT_INITIAL_DISTANCE["dowg"]
    assert adam.param_groups[0]["initial_distance"] == DEFAULT_INITIAL_DISTANCE["dowg_neutral"]
    assert YellowFin([p], step_rule="secant").param_groups[0]["initial_distance"] == DEFAULT_INITIAL_DISTANCE["secant"]
    assert YellowFin([p], initial_distance=0.05).param_groups[0]["initial_distance"] == 0.05
    assert plain.defaults["initial_distance"] is None  # (so that a group with another rule picks its own default)
    assert YellowFin([p], tuner="reference").param_groups[0]["initial_distance"] is None
    with pytest.raises(ValueError, match="initial_distance"):
        YellowFin([p], tuner="reference", initial_distance=1e-3)  # the reference starts from initial_lr
    for bad in (0.0, -1e-3, math.inf, math.nan):
        with pytest.raises(ValueError, match="initial_distance"):
            YellowFin([p], initial_distance=bad)
    with pytest.raises(TypeError, match="initial_distance"):
        YellowFin([p], initial_distance="1e-3")
    # The growth cap: off for every rule unless asked; the reference has none.
    assert plain.param_groups[0]["growth_cap"] is False and adam.param_groups[0]["growth_cap"] is False
    assert YellowFin([p], step_rule="dog", growth_cap=True).param_groups[0]["growth_cap"] is True
    with pytest.raises(ValueError, match="growth_cap"):
        YellowFin([p], tuner="reference", growth_cap=True)
    with pytest.raises(TypeError, match="growth_cap"):
        YellowFin([p], growth_cap=1)
    # The distance hold: DoWG's (the plain default's) only unless asked, resolved and named by the group; the reference
    # measures no distance.
    assert plain.param_groups[0]["hold_distance_uphill"] is True and adam.param_groups[0]["hold_distance_uphill"] is False
    assert default.param_groups[0]["hold_distance_uphill"] is True and plain.defaults["hold_distance_uphill"] is None
    assert YellowFin([p], step_rule="dog").param_groups[0]["hold_distance_uphill"] is False
    assert YellowFin([p], precondition="adam", hold_distance_uphill=True).param_groups[0]["hold_distance_uphill"]
    assert YellowFin([p], tuner="reference").param_groups[0]["hold_distance_uphill"] is None
    with pytest.raises(ValueError, match="hold_distance_uphill"):
        YellowFin([p], tuner="reference", hold_distance_uphill=False)
    with pytest.raises(TypeError, match="hold_distance_uphill"):
        YellowFin([p], hold_distance_uphill="yes")


@pytest.mark.parametrize("option, saved_as, ran, now", [
    ("step_rule", "absent", "secant", "dowg"),  # saved before step_rule existed: the secant rule
    ("step_rule", None, "dog", "dowg"),  # saved while None meant DoG's rule
    ("relative_clip", "absent", math.inf, 1.1),  # saved before relative_clip existed: no clipping
    ("clip_trigger", "absent", 1.1, 5.0),  # saved before clip_trigger existed: the clip acted at its own level
    ("initial_distance", "absent", 1e-3, 1e-2),  # saved before initial_distance existed: DoWG's start was 1e-3
    ("growth_cap", "absent", False, True),  # saved before growth_cap existed: no rule's step had one
    ("hold_distance_uphill", "absent", False, True),  # saved before the option existed: no rule held its distance
])
def test_a_scale_free_checkpoint_that_does_not_name_an_option_keeps_what_it_ran(option, saved_as, ran, now):
    # (the clip tightened to 1.1, so that it acts on this small problem: what the trigger changes shows; a memory of
    # 10 steps, so that the growth cap has one before the checkpoint)
    clip = {"clip_trigger": {"relative_clip": 1.1}, "growth_cap": {"beta": 0.9}}.get(option, {})
    expected, _, _ = train(lambda params: YellowFin(params, tuner="scale_free", **clip, **{option: ran}), steps=40)
    model, x, y = mlp_problem()
    opt = YellowFin(model.parameters(), tuner="scale_free", **clip, **{option: ran})
    for step in range(40):
        if step == 20:
            old = opt.state_dict()
            for group in old["param_groups"]:
                if saved_as == "absent":
                    del group[option]
                else:
                    group[option] = saved_as
            opt = YellowFin(model.parameters(), tuner="scale_free", **clip, **{option: now})
            opt.load_state_dict(old)
            assert opt.param_groups[0][option] == ran
        rows = (torch.arange(16) + 16 * step) % 64
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    assert torch.equal(flat(model), expected)


# Under asynchrony (docs/algorithm.md §8): the systems report the gradients' mean staleness.
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_a_reported_staleness_cuts_the_step_by_the_root_of_one_plus_it(metric, flavour):
    # Two copies of one run part at step 10: the one told that its gradients are 3 updates old takes half the step
    # (1 / sqrt(1 + 3)) at the same momentum, so it moves half as far; its record says what it was told.
    def scale_free(params):  # (in heavy ball: the staleness cut is heavy ball's)
        return YellowFin(params, momentum_form="heavy_ball", **METRICS[metric], **FLAVOURS[flavour])

    _, model, opt = train(scale_free, steps=10)
    twin_model = copy.deepcopy(model)
    twin = scale_free(twin_model.parameters())
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # (a state_dict shares the optimizer's tensors)
    twin.set_staleness(3)
    _, x, y = mlp_problem()
    moves = []
    for net, optimizer in ((model, opt), (twin_model, twin)):
        before = flat(net)
        optimizer.zero_grad()
        ((net(x[:16]) - y[:16]) ** 2).mean().backward()
        optimizer.step()
        moves.append(flat(net) - before)
    assert twin.stats()["mu"] == opt.stats()["mu"]
    assert twin.stats()["alpha"] == pytest.approx(0.5 * opt.stats()["alpha"], rel=1e-12)
    torch.testing.assert_close(moves[1], 0.5 * moves[0], rtol=1e-9, atol=1e-15)
    assert twin.stats()["staleness"] == 3.0 and opt.stats()["staleness"] == 0.0
    assert twin.state_dict()["tuners"][0]["staleness"] == 3.0


def test_a_reported_staleness_keeps_the_trajectory_free_of_the_loss_scale():
    def stale(params):
        return YellowFin(params, tuner="scale_free", momentum_form="heavy_ball")

    told = lambda opt: opt.set_staleness(2.5)  # noqa: E731
    unscaled, _, _ = train(stale, steps=100, after_step=told)
    scaled, _, _ = train(stale, steps=100, loss_scale=1e4, after_step=told)
    assert relative_difference(scaled, unscaled) < 1e-10
    uncut, _, _ = train(stale, steps=100)
    assert relative_difference(unscaled, uncut) > 1e-3


def test_the_reference_ignores_a_reported_staleness():
    # (its step is set from curvature, and its closed loop corrects the momentum that asynchrony adds)
    expected, _, _ = train(YellowFin.reference_variant, steps=30)
    told, _, _ = train(YellowFin.reference_variant, steps=30, after_step=lambda opt: opt.set_staleness(5))
    assert torch.equal(told, expected)


@pytest.mark.parametrize("value, error", [(-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                          (True, TypeError), ("3", TypeError)])
def test_a_staleness_that_is_not_a_finite_number_at_least_zero_is_refused(value, error):
    model, _, _ = mlp_problem()
    opt = YellowFin(model.parameters(), tuner="scale_free")
    with pytest.raises(error, match="mean_staleness"):
        opt.set_staleness(value)
    assert opt.stats()["staleness"] == 0.0


def test_the_secant_rule_refuses_a_staleness():
    model, _, _ = mlp_problem()
    opt = YellowFin(model.parameters(), tuner="scale_free", step_rule="secant")
    opt.set_staleness(0.0)
    with pytest.raises(ValueError, match="secant"):
        opt.set_staleness(1.0)


def test_an_unknown_tuner_is_refused():
    model, _, _ = mlp_problem()
    with pytest.raises(ValueError, match="tuner"):
        YellowFin(model.parameters(), tuner="scale-free")


def test_each_tuner_has_its_own_memory_unless_beta_is_given():
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    assert YellowFin._settings(YellowFin([p], tuner="reference").param_groups[0]).beta == 0.999
    assert YellowFin._settings(YellowFin([p], tuner="scale_free").param_groups[0]).beta == 0.99
    assert YellowFin._settings(YellowFin([p]).param_groups[0]).beta == 0.99  # the default: the scale-free tuner's
    assert TunerSettings().tuner == "scale_free" and TunerSettings().beta == 0.99
    assert YellowFin._settings(YellowFin([p], tuner="scale_free", beta=0.9).param_groups[0]).beta == 0.9
    assert YellowFin._settings(YellowFin([p], tuner="reference", beta=0.9).param_groups[0]).beta == 0.9
    opt = YellowFin([p], tuner="reference", per_group_tuning=True)
    opt.add_param_group({"params": [q], "tuner": "scale_free"})  # a group that picks the other tuner later
    assert [YellowFin._settings(group).beta for group in opt.param_groups] == [0.999, 0.99]
    opt = YellowFin([q], per_group_tuning=True)
    opt.add_param_group({"params": [p], "tuner": "reference"})  # and the other way round
    assert [YellowFin._settings(group).beta for group in opt.param_groups] == [0.99, 0.999]


def test_reference_variant_pins_the_reference_tuner():
    model, _, _ = mlp_problem()
    assert YellowFin.reference_variant(model.parameters()).param_groups[0]["tuner"] == "reference"
