"""The preconditioned tuner (``tuner="scale_free", precondition="adam"``, docs/algorithm.md §9): the scale-free tuner
measuring and stepping in Adam's metric. Its trajectory does not depend on the loss scale, its three flavours agree,
it reproduces the research prototype (benchmarks/tuner_screen.py's AdamMetricTuner), keeps three buffers per
parameter, and saves, loads and refuses what it cannot run. (What it shares with the scale-free tuner in the plain
metric, checkpoints that resume, skipped steps, per-group tuning, host reads and the separable problem, is tested
for both in tests/test_scale_free.py.)"""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from yellowfin import YellowFin
from yellowfin.state import PRECONDITIONED_STEP_RULES
from helpers import flat_state, run_with_holes
from test_scale_free import everything_but_the_skip_count, flat, mlp_problem, relative_difference, train

FLAVOURS = {"single_tensor": dict(foreach=False), "multi_tensor": {}, "compiled": dict(fused=True)}
# (heavy ball: the tuner in Adam's metric as it was derived; its primal-average form, the default there, is tested
# with the plain metric's in tests/test_primal_average.py)
PRECONDITIONED = dict(tuner="scale_free", precondition="adam", momentum_form="heavy_ball")


def preconditioned(params, **options):
    return YellowFin(params, **PRECONDITIONED, **options)


@pytest.mark.parametrize("step_rule", PRECONDITIONED_STEP_RULES)
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_the_trajectory_does_not_depend_on_the_loss_scale(flavour, step_rule):
    def make(params):
        return preconditioned(params, step_rule=step_rule, **FLAVOURS[flavour])

    unscaled, _, opt = train(make)
    assert opt.stats()["step"] == 300 and 0.0 < opt.stats()["mu"] < 1.0
    for loss_scale in (1e-4, 1e-2, 1e2, 1e4):
        scaled, _, _ = train(make, loss_scale=loss_scale)
        assert relative_difference(scaled, unscaled) < 1e-6, loss_scale


@pytest.mark.parametrize("options", [*(dict(step_rule=rule) for rule in PRECONDITIONED_STEP_RULES),
                                     dict(hold_distance_uphill=True)], ids=str)
def test_the_multi_tensor_flavour_gives_the_single_tensor_numbers(options):
    # Frozen layer, a 0-dim parameter, two groups with different lr, gradients missing on some steps, a NaN step.
    params_ref, opt_ref = run_with_holes(steps=25, nan_at=4, foreach=False, **options, **PRECONDITIONED)
    params, opt = run_with_holes(steps=25, nan_at=4, **options, **PRECONDITIONED)
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["step"] == 24
    for a, b in zip(params_ref, params):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=0.0)
    for a, b in zip(flat_state(opt_ref), flat_state(opt)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype, rtol, options", [
    (torch.float64, 1e-12, {}),
    (torch.float32, 1e-6, {}),
    (torch.float64, 1e-12, dict(weight_decay=1e-2, decoupled_weight_decay=True, maximize=True)),
    (torch.float64, 1e-12, dict(step_rule="dowg_neutral")),
], ids=["float64", "float32", "float64-options", "float64-dowg_neutral"])
def test_the_compiled_flavour_gives_the_single_tensor_numbers(dtype, rtol, options):
    # fused=True runs the preconditioned tuner: frozen layer, a 0-dim parameter, two groups with different lr,
    # gradients missing on some steps, a NaN step.
    params_ref, opt_ref = run_with_holes(dtype, steps=20, nan_at=4, foreach=False, **PRECONDITIONED, **options)
    params, opt = run_with_holes(dtype, steps=20, nan_at=4, fused=True, **PRECONDITIONED, **options)
    assert opt.param_groups[0]["fused"] and opt.param_groups[0]["precondition"] == "adam"
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["step"] == 19
    # An entry that passes near zero (x - step with both ~0.1) carries the rounding of its operands, an ulp at their
    # scale, so beside rtol each tensor allows a few ulps of its own largest entry (in float32 an entry of 4e-4
    # differed by 2^-27, one ulp of 0.1).
    for a, b in zip([*params_ref, *flat_state(opt_ref)], [*params, *flat_state(opt)]):
        ulps = 4 * torch.finfo(a.dtype).eps * float(a.detach().abs().max()) if a.is_floating_point() else 0.0
        torch.testing.assert_close(b, a, rtol=rtol, atol=ulps)


# (the neutral rule's default start is 1e-2, the prototype's adam_metric_dowg_neutral screened from 1e-3)
@pytest.mark.parametrize("step_rule, options, variant", [
    ("dog", {}, "adam_metric_dog_start_1e-3"),
    ("dowg_neutral", {"initial_distance": 1e-3}, "adam_metric_dowg_neutral"),
    ("dowg_neutral", {}, "adam_metric_dowg_neutral_start_1e-2"),
], ids=str)
def test_matches_the_flat_prototype(step_rule, options, variant):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tuner_screen import ADAM_METRIC_VARIANTS, AdamMetricTuner

    library, _, opt = train(lambda params: preconditioned(params, step_rule=step_rule, foreach=False, **options))
    prototype, _, flat_tuner = train(lambda params: AdamMetricTuner(params, **ADAM_METRIC_VARIANTS[variant]))
    # The same algorithm; the prototype's metric eps is relative to this step's mean over the flat vector, the
    # library's to the last step's (so that it is known before the first pass): a difference of 1e-8 of the metric.
    assert relative_difference(library, prototype) < 1e-7
    assert opt.stats()["alpha"] == pytest.approx(flat_tuner.trace["alpha"][-1], rel=1e-6)
    assert opt.stats()["mu"] == pytest.approx(flat_tuner.trace["mu"][-1], rel=1e-6)


def test_it_keeps_three_buffers_per_parameter():
    _, model, opt = train(preconditioned, steps=3)
    for p in model.parameters():
        buffers = {name for name, value in opt.state[p].items() if value.shape == p.shape}
        assert buffers == {"second_moment", "momentum_buffer", "initial_param"}
        assert set(opt.state[p]) - buffers == {"step"} and opt.state[p]["step"].shape == ()


def test_the_first_step_is_adams_sign_step_of_dogs_initial_distance():
    # At t = 0 the metric is |g| (P = g^2 after debiasing), so the step is along sign(g), of length d_0 in the metric.
    model, x, y = mlp_problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = preconditioned(model.parameters())
    ((model(x) - y) ** 2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    moves = [p.detach() - b for p, b in zip(model.parameters(), before)]
    scale = float(moves[0].flatten()[0] / -grads[0].flatten()[0].sign())
    for move, grad in zip(moves, grads):  # (moves of ~1e-7 read off parameters of ~0.3: rounding ~1e-10)
        torch.testing.assert_close(move, -scale * grad.sign(), rtol=1e-8, atol=0.0)
    numel = sum(g.numel() for g in grads)
    root_mean = (sum(float(g.abs().sum()) for g in grads) / numel) ** 0.5
    start = 1e-2 * (1.0 + float(torch.cat([b.flatten() for b in before]).norm())) * root_mean  # (its rule's start)
    assert opt.stats()["distance"] == pytest.approx(start, rel=1e-12)
    metric_length = sum(float((g.abs() * m * m).sum()) for g, m in zip(grads, moves)) ** 0.5
    assert metric_length == pytest.approx(start, rel=1e-8) and opt.stats()["mu"] == 0.0


def test_decoupled_weight_decay_shrinks_by_the_effective_step_as_adamw_does():
    # AdamW: x <- x - lr (step + lambda x). Here the effective step eta = alpha / (1 - mu) plays lr's part.
    model, x, y = mlp_problem()
    opt = preconditioned(model.parameters(), decoupled_weight_decay=True)
    for step in range(20):
        rows = (torch.arange(16) + 16 * step) % 64
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    twin, twin_opt = copy.deepcopy((model, opt))
    twin_opt.param_groups[0]["weight_decay"] = 0.1
    start = flat(model)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step()
    stats = opt.stats()
    assert 0.0 < stats["mu"] < 1.0 and twin_opt.stats() == stats
    eta = stats["alpha"] / (1.0 - stats["mu"])
    torch.testing.assert_close(flat(twin) - flat(model), -eta * 0.1 * start, rtol=1e-9, atol=1e-17)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("gradient", ["nan", "zero"])
def test_a_step_it_does_not_apply_changes_nothing_under_decoupled_weight_decay(flavour, gradient):
    # Such a step applies momentum 1 and step 0, where the decay's effective step eta = step / (1 - momentum) is
    # 0 / 0: the parameters must not shrink by it (nor turn NaN).
    model, x, y = mlp_problem()
    opt = preconditioned(model.parameters(), weight_decay=0.1, decoupled_weight_decay=True, **FLAVOURS[flavour])
    for _ in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    before_params, before_state = flat(model), everything_but_the_skip_count(opt, model)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if gradient == "nan":
        model[0].weight.grad[0, 0] = float("nan")
    else:
        for p in model.parameters():
            p.grad.zero_()
    opt.step()
    assert opt.stats()["skipped_steps"] == (1 if gradient == "nan" else 0) and opt.stats()["step"] == 5
    assert torch.equal(flat(model), before_params)
    for a, b in zip(before_state, everything_but_the_skip_count(opt, model)):
        assert torch.equal(a, b)


def resumed_halfway(make_optimizer, make_resumed, steps):
    """The MLP trained for ``steps`` steps by ``make_optimizer``'s optimizer, whose state is loaded halfway into
    ``make_resumed``'s, which takes the rest; returns (flat parameters, the resumed optimizer)."""
    model, x, y = mlp_problem()
    opt = make_optimizer(model.parameters())
    for step in range(steps):
        if step == steps // 2:
            saved = copy.deepcopy(opt.state_dict())
            opt = make_resumed(model.parameters())
            opt.load_state_dict(saved)
        rows = (torch.arange(16) + 16 * step) % 64
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    return flat(model), opt


def test_a_checkpoint_restores_the_tuner_it_was_saved_with():
    # As for torch's optimizers, the saved groups' options win: a preconditioned checkpoint loaded into an optimizer
    # built without the option continues preconditioned.
    expected, _, _ = train(preconditioned, steps=30)
    params, opt = resumed_halfway(preconditioned, lambda p: YellowFin(p, tuner="scale_free"), steps=30)
    assert opt.param_groups[0]["precondition"] == "adam"
    assert torch.equal(params, expected)


def test_a_checkpoint_saved_under_dogs_rule_keeps_running_it_after_the_default_changed():
    # Adam's metric took DoG's rule by default before the neutral DoWG rule; the group stored the rule it resolved,
    # so a checkpoint saved then resumes DoG's run exactly, in an optimizer built with today's default.
    assert preconditioned([torch.zeros(1, requires_grad=True)]).param_groups[0]["step_rule"] == "dowg_neutral"
    expected, _, _ = train(lambda p: preconditioned(p, step_rule="dog"), steps=40)
    params, opt = resumed_halfway(lambda p: preconditioned(p, step_rule="dog"), preconditioned, steps=40)
    assert opt.param_groups[0]["step_rule"] == "dog"
    assert torch.equal(params, expected)


def test_a_checkpoint_whose_buffers_do_not_fit_its_tuner_is_refused():
    _, model, opt = train(preconditioned, steps=3)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["precondition"] = None  # buffers of the preconditioned tuner, options of the plain one
    fresh = YellowFin(model.parameters(), tuner="scale_free")
    with pytest.raises(ValueError, match="grad_avg"):
        fresh.load_state_dict(saved)
    broken = opt.state_dict()
    del broken["state"][0]["second_moment"]
    with pytest.raises(ValueError, match="second_moment"):
        preconditioned(model.parameters()).load_state_dict(broken)


def test_stats_report_the_signal_and_not_the_secant():
    _, _, opt = train(preconditioned, steps=40)
    stats = opt.stats()
    assert stats["distance"] > 0.0 and stats["signal"] != 0.0 and "secant_curvature" not in stats


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_complex_parameters_step_as_their_real_twins(flavour):
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(6, dtype=torch.complex128))
    twin = nn.Parameter(torch.view_as_real(z.detach()).clone())
    target = torch.randn(6, dtype=torch.complex128)
    opts = preconditioned([z], **FLAVOURS[flavour]), preconditioned([twin], **FLAVOURS[flavour])
    for _ in range(15):
        for opt in opts:
            opt.zero_grad()
        ((z - target).abs() ** 2).sum().backward()
        ((twin - torch.view_as_real(target)) ** 2).sum().backward()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), twin.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options, message", [
    (dict(tuner="reference", precondition="adam"), "tuner='scale_free'"),  # the reference measures in the loss's units
    (dict(tuner="scale_free", step_rule="secant", precondition="adam"), "step_rule='dog' or 'dowg_neutral'"),
    # (DoWG itself diverged there)
    (dict(tuner="scale_free", step_rule="dowg", precondition="adam"), "step_rule='dog' or 'dowg_neutral'"),
    (dict(tuner="scale_free", precondition="Adam"), "precondition"),
    (dict(tuner="scale_free", precondition="adam", nesterov=True), "nesterov"),
])
def test_settings_it_cannot_run_are_refused(options, message):
    model, _, _ = mlp_problem()
    with pytest.raises(ValueError, match=message):
        YellowFin(model.parameters(), **options)


def test_the_default_tuner_takes_the_preconditioner_and_the_reference_does_not():
    # The default is the scale-free tuner, so precondition="adam" alone builds the preconditioned tuner with its
    # own rule, in primal-average form with the clip at its level; in heavy ball without the clip. The reference
    # (reference_variant) refuses it.
    model, _, _ = mlp_problem()
    group = YellowFin(model.parameters(), precondition="adam").param_groups[0]
    assert group["tuner"] == "scale_free" and group["step_rule"] == "dowg_neutral"
    assert group["momentum_form"] == "primal_average"
    assert group["relative_clip"] == 2.0 and group["clip_trigger"] == 2.0
    heavy_ball = preconditioned(model.parameters()).param_groups[0]
    assert heavy_ball["relative_clip"] == math.inf and heavy_ball["clip_trigger"] == math.inf
    assert YellowFin._settings({**group, "momentum_form": "heavy_ball", "relative_clip": None,
                                "clip_trigger": None, "average": None}) == YellowFin._settings(heavy_ball)
    with pytest.raises(ValueError, match="tuner='scale_free'"):
        YellowFin.reference_variant(model.parameters(), precondition="adam")


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = preconditioned(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
