"""The properties PyTorch's own optimizer suite checks for every optimizer, and YellowFin's own."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from yellowfin import YellowFin
from helpers import TUNERS, complex_and_real_twin, flat_state, loss_of, make_data, make_model, run_with_holes, train

# A generic optimizer property runs on both tuners (helpers.TUNERS): the authors' reference algorithm
# (YellowFin.reference_variant, the default until the scale-free tuner replaced it) and the scale-free tuner (the
# default, docs/algorithm.md §8); a test of the authors' algorithm itself builds the reference explicitly.


def _yf(params, tuner, **options):
    """YellowFin with the tuner named explicitly: the reference as its authors ran it, or the scale-free one."""
    if tuner == "reference":
        return YellowFin.reference_variant(params, **options)
    return YellowFin(params, tuner="scale_free", **options)


# The scale-free tuner's first step moves exactly DoG's initial distance d_0 = r (1 + ||x_0||) against the gradient,
# without momentum: alpha_0 = d_0 / ||g|| (of the clipped gradient), r = 1e-3 for its default step rule "dowg"
# (docs/algorithm.md §8, steps 4 and 8).
def _scale_free_first_alpha(initial_param_norm, grad_norm):
    return 1e-3 * (1.0 + initial_param_norm) / grad_norm


CONFIGS = [
    {},
    {"foreach": False},
    {"weight_decay": 1e-3},
    {"weight_decay": 1e-3, "decoupled_weight_decay": True},
    {"clip_norm": 1.0},
    {"per_group_tuning": True},
    {"sparsity_correction": True},
]
# Options of one tuner alone: the reference's own mechanisms and variants (the scale-free tuner refuses nesterov
# and curvature_smoothing="linear", test_the_default_refuses_the_options_of_the_reference_alone; it has no slow
# start or adaptive clipping to turn off), and the scale-free tuner's step rules and relative clip.
CONFIGS_OF = {
    "reference": [{"nesterov": True}, {"adaptive_clipping": False, "slow_start": False},
                  {"curvature_smoothing": "linear"}],
    "scale_free": [{"step_rule": "dog"}, {"step_rule": "secant"}, {"relative_clip": math.inf}],
}


@pytest.mark.parametrize("tuner, config", [(tuner, config) for tuner in TUNERS
                                           for config in CONFIGS + CONFIGS_OF[tuner]], ids=str)
def test_goes_the_right_direction(tuner, config):
    model, data = make_model(), make_data()
    before = float(loss_of(model, data).detach())
    train(model, _yf(model.parameters(), tuner, **config), data, steps=300)
    assert float(loss_of(model, data)) < 0.5 * before


@pytest.mark.parametrize("options", [{"nesterov": True}, {"curvature_smoothing": "linear"}, {"update_first": True},
                                     {"smooth_tuned": True}], ids=str)
def test_the_default_refuses_the_options_of_the_reference_alone(options):
    (name,) = options
    with pytest.raises(ValueError, match=rf"{name}=.*an option of tuner='reference'"):
        YellowFin(make_model().parameters(), **options)
    assert YellowFin.reference_variant(make_model().parameters(), **options).param_groups[0][name] == options[name]


def test_the_default_is_the_scale_free_tuner_with_its_step_rule_clip_and_momentum_form():
    data = make_data()
    default_model, named_model = make_model(), make_model()
    default = YellowFin(default_model.parameters())
    group = default.param_groups[0]
    assert group["tuner"] == "scale_free" and group["step_rule"] == "dowg"
    # The group names the memory and form it resolved, so that a checkpoint keeps them when the default changes.
    assert group["beta"] == 0.99 and default.state_dict()["param_groups"][0]["beta"] == 0.99
    assert group["momentum_form"] == "primal_average"
    assert default.state_dict()["param_groups"][0]["momentum_form"] == "primal_average"
    assert YellowFin.reference_variant(make_model().parameters(), beta=None).param_groups[0]["beta"] == 0.999
    assert group["relative_clip"] == 2.0 and group["clip_trigger"] == 2.0  # (the form's clip acts at its level)
    named = YellowFin(named_model.parameters(), tuner="scale_free", beta=0.99, step_rule="dowg", relative_clip=2.0,
                      clip_trigger=2.0, momentum_form="primal_average")
    train(default_model, default, data, steps=20)
    train(named_model, named, data, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(default_model.parameters(), named_model.parameters()))
    assert default.stats() == named.stats()


def test_paper_variant_goes_the_right_direction():
    model, data = make_model(), make_data()
    before = float(loss_of(model, data))
    train(model, YellowFin.paper_variant(model.parameters(), initial_lr=0.01), data, steps=300)
    assert float(loss_of(model, data)) < 0.5 * before


@pytest.mark.parametrize("tuner, options", [("reference", {"initial_lr": 0.01}), ("scale_free", {})], ids=str)
def test_maximize_climbs(tuner, options):
    model, data = make_model(), make_data()
    opt = _yf(model.parameters(), tuner, maximize=True, **options)
    before = float(loss_of(model, data))
    for _ in range(5):
        opt.zero_grad()
        loss_of(model, data).backward()
        opt.step()
    assert float(loss_of(model, data)) > before


def test_first_step_uses_initial_values():
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = YellowFin.reference_variant([p], initial_lr=0.1, initial_momentum=0.5)
    p.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0 - 0.05, -2.0 - 0.1], dtype=torch.float64))
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.tensor([0.5, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_rule_matches_torch_sgd_when_values_are_fixed(nesterov):
    start = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    grad = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = YellowFin.reference_variant([ours], initial_lr=0.1, initial_momentum=0.5, nesterov=nesterov)
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=0.5, nesterov=nesterov)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    sgd.step()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-15)


# The first step's alpha: the reference's alpha_0 (initial_lr), or the scale-free tuner's d_0 / ||g|| with
# x_0 = 2 and g = 1 (decoupled decay leaves the gradient as it is): 1e-3 (1 + 2) / 1.
@pytest.mark.parametrize("tuner, options, alpha", [("reference", {"initial_lr": 0.1}, 0.1),
                                                   ("scale_free", {}, _scale_free_first_alpha(2.0, 1.0))], ids=str)
def test_decoupled_weight_decay_shrinks_by_lr_times_decay(tuner, options, alpha):
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = _yf([p], tuner, weight_decay=0.5, decoupled_weight_decay=True, **options)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert opt.stats()["alpha"] == pytest.approx(alpha, rel=1e-12)
    assert float(p) == pytest.approx(2.0 * (1 - alpha * 0.5) - alpha * 1.0, rel=1e-12)


# The curvature sample is ||g + decay x||^2 = 4; its log average carries the tuner's guard: the reference's eps
# (1e-6), the scale-free tuner's 1e-30 (docs/algorithm.md §8, step 1).
@pytest.mark.parametrize("tuner, guard", [("reference", 1e-6), ("scale_free", 1e-30)])
def test_coupled_weight_decay_enters_statistics(tuner, guard):
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = _yf([p], tuner, weight_decay=0.5)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    assert opt.stats()["h_max"] == pytest.approx((1.0 + 0.5 * 2.0) ** 2 + guard)


# The gradient (30, 40) clipped to norm 1: (0.6, 0.8), what both the statistics (h_max = 1 plus the guard) and the
# update (the momentum buffer, mu_0 = 0) see. The reference steps it by alpha_0 = 1; the scale-free tuner by
# d_0 / ||s g|| = 1e-3 (1 + 0) / 1.
@pytest.mark.parametrize("tuner, options, alpha, guard", [
    ("reference", {"initial_lr": 1.0}, 1.0, 1e-6),
    ("scale_free", {"momentum_form": "heavy_ball"}, _scale_free_first_alpha(0.0, 1.0), 1e-30),
], ids=str)
def test_clip_norm_bounds_the_gradient(tuner, options, alpha, guard):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = _yf([p], tuner, clip_norm=1.0, **options)
    p.grad = torch.tensor([30.0, 40.0], dtype=torch.float64)
    opt.step()
    clipped = torch.tensor([0.6, 0.8], dtype=torch.float64)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], clipped, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(p.detach(), -alpha * clipped, rtol=1e-12, atol=0.0)
    assert opt.stats()["h_max"] == pytest.approx(1.0 + guard)


def test_clip_norm_and_the_relative_clip_together_clip_the_statistics_to_clip_norm_and_the_update_further():
    # The scale-free tuner in heavy ball: a first gradient of norm 0.1 sets the running RMS to 0.1; a second of norm
    # 1000 is cut to clip_norm = 10 for the statistics, and, being above clip_trigger = 10 times the RMS, applied at
    # relative_clip = 2 times the RMS, 0.2 (docs/algorithm.md §8, step 1).
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([p], tuner="scale_free", clip_norm=10.0, momentum_form="heavy_ball")
    for value in (0.1, 1000.0):
        before = opt.state[p]["momentum_buffer"].clone() if p in opt.state else None
        p.grad = torch.full((1,), value, dtype=torch.float64)
        opt.step()
    assert float(opt.tuner_state().curvatures[1]) == pytest.approx(10.0**2, rel=1e-12)  # the clip_norm'ed ||g||^2
    expected = opt.stats()["applied_momentum"] * before + 0.2
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected, rtol=1e-12, atol=0.0)


def test_clip_norm_and_adaptive_clipping_together_clip_the_statistics_to_the_adaptive_threshold():
    # After a first gradient of norm 0.1, h_max ~ 0.01: the statistics may see norm sqrt(100 h_max) ~ 1.
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = YellowFin.reference_variant([p], clip_norm=10.0)
    for value in (0.1, 1000.0):
        p.grad = torch.full((1,), value, dtype=torch.float64)
        opt.step()
    assert float(opt.tuner_state().curvatures[1]) == pytest.approx(1.0, rel=1e-3)  # the clipped ||g||^2


@pytest.mark.parametrize("tuner", TUNERS)
def test_group_with_tiny_multiplier_does_not_move(tuner):
    model = make_model(dtype=torch.float32)
    data = make_data(dtype=torch.float32)
    first, second = model[0], model[2]
    opt = _yf([{"params": first.parameters()}, {"params": second.parameters(), "lr": 1e-28}], tuner)
    frozen = [p.detach().clone() for p in second.parameters()]
    moving = [p.detach().clone() for p in first.parameters()]
    train(model, opt, data, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(frozen, second.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(moving, first.parameters()))


@pytest.mark.parametrize("tuner", TUNERS)
def test_no_gradients_is_a_no_op(tuner):
    model = make_model()
    opt = _yf(model.parameters(), tuner)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.stats()["step"] == 0 and len(opt.state) == 0


def test_state_is_two_buffers_per_parameter_after_a_step():
    model, data = make_model(), make_data()
    opt = YellowFin.reference_variant(model.parameters())
    train(model, opt, data, steps=1)
    for p in model.parameters():
        assert set(opt.state[p]) == {"grad_avg", "momentum_buffer"}
        assert opt.state[p]["momentum_buffer"].shape == p.shape


@pytest.mark.parametrize("average", [False, True])
def test_scale_free_state_is_three_buffers_per_parameter_the_third_the_initial_parameters(average):
    # (and a fourth, the average handed out, where one is kept: by default, in the primal-average form)
    model, data = make_model(), make_data()
    initial = [p.detach().clone() for p in model.parameters()]
    opt = YellowFin(model.parameters(), tuner="scale_free", **({} if average else {"average": False}))
    train(model, opt, data, steps=2)
    for p, x0 in zip(model.parameters(), initial):
        assert set(opt.state[p]) == {"grad_avg", "momentum_buffer", "initial_param"} | ({"averaged_param"} if average
                                                                                          else set())
        assert opt.state[p]["momentum_buffer"].shape == p.shape
        assert torch.equal(opt.state[p]["initial_param"], x0) and not torch.equal(p.detach(), x0)


def test_closure_is_called_once_and_its_loss_returned():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, data)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)


def _checkpoint_roundtrip(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("tuner", TUNERS)
def test_state_dict_reloads_with_weights_only_and_resumes_bit_identically(tuner):
    data = make_data()
    model = make_model()
    opt = _yf(model.parameters(), tuner)
    train(model, opt, data, steps=15, seed=3)
    model_state = copy.deepcopy(model.state_dict())
    saved = _checkpoint_roundtrip(opt)
    train(model, opt, data, steps=15, seed=4)

    resumed_model = make_model(seed=99)
    resumed_model.load_state_dict(model_state)
    resumed = _yf(resumed_model.parameters(), tuner)
    resumed.load_state_dict(saved)
    train(resumed_model, resumed, data, steps=15, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(flat_state(opt), flat_state(resumed)))
    assert resumed.stats() == opt.stats()


@pytest.mark.parametrize("tuner", TUNERS)
def test_state_dict_is_deterministic(tuner):
    data = make_data()
    states = []
    for _ in range(2):
        model = make_model()
        opt = _yf(model.parameters(), tuner)
        train(model, opt, data, steps=10)
        states.append(flat_state(opt))
    assert all(torch.equal(a, b) for a, b in zip(*states))


@pytest.mark.parametrize("tuner", TUNERS)
def test_per_group_tuning_state_dict_roundtrip(tuner):
    model, data = make_model(), make_data()
    opt = _yf([{"params": model[0].parameters()}, {"params": model[2].parameters()}], tuner, per_group_tuning=True)
    train(model, opt, data, steps=5)
    fresh = _yf([{"params": model[0].parameters()}, {"params": model[2].parameters()}], tuner, per_group_tuning=True)
    fresh.load_state_dict(_checkpoint_roundtrip(opt))
    assert fresh.stats() == opt.stats()


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("break_it", ["shape", "count", "tuner", "groups", "missing", "window"])
def test_mismatched_state_dict_fails_clearly_and_changes_nothing(break_it, tuner):
    model, data = make_model(), make_data()
    opt = _yf(model.parameters(), tuner)
    train(model, opt, data, steps=3)
    other_model = make_model()
    other = _yf(other_model.parameters(), tuner)
    train(other_model, other, data, steps=5)
    saved = other.state_dict()
    if break_it == "shape":
        saved["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    elif break_it == "count":
        saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:-1]
    elif break_it == "tuner":
        del saved["tuners"][0]["mu"]
    elif break_it == "groups":
        saved["param_groups"] = saved["param_groups"] * 2
    elif break_it == "missing":
        del saved["tuners"]
    elif break_it == "window":
        saved["param_groups"][0]["curvature_window"] = 7
    before = [t.clone() for t in flat_state(opt)]
    stats_before = opt.stats()
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(before, flat_state(opt)))
    assert opt.stats() == stats_before
    assert opt.param_groups[0]["curvature_window"] == 20


@pytest.mark.parametrize("tuner", TUNERS)
def test_deepcopy_continues_identically(tuner):
    data = make_data()
    model = make_model()
    opt = _yf(model.parameters(), tuner)
    train(model, opt, data, steps=5)
    model_copy = copy.deepcopy(model)
    opt_copy = _yf(model_copy.parameters(), tuner)
    opt_copy.load_state_dict(copy.deepcopy(opt.state_dict()))
    whole_copy = copy.deepcopy(opt)
    assert whole_copy.stats() == opt.stats()
    assert all(torch.equal(a, b) for a, b in zip(flat_state(whole_copy), flat_state(opt)))
    train(model, opt, data, steps=5, seed=7)
    train(model_copy, opt_copy, data, steps=5, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_copy.parameters()))


@pytest.mark.parametrize("tuner", TUNERS)
def test_tensor_and_float_multipliers_agree(tuner):
    data = make_data()
    results = []
    for lr in (0.5, torch.tensor(0.5)):
        model = make_model()
        train(model, _yf(model.parameters(), tuner, lr=lr), data, steps=10)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# The first step: the reference's alpha_0 = 0.1, or the scale-free tuner's d_0 / ||g|| = 1e-3 (1 + 0) / 1, times
# the multiplier 1.
@pytest.mark.parametrize("tuner, options, first_alpha", [
    ("reference", {"initial_lr": 0.1, "adaptive_clipping": False}, 0.1),
    ("scale_free", {}, _scale_free_first_alpha(0.0, 1.0)),
], ids=str)
def test_lr_scheduler_moves_the_multiplier(tuner, options, first_alpha):
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = _yf([p], tuner, **options)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert opt.param_groups[0]["lr"] == 1.0
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert float(p) == pytest.approx(-first_alpha)  # first step: alpha_0 times the multiplier 1
    before = float(p)
    velocity = opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    new_mu, new_alpha = opt.stats()["mu"], opt.stats()["alpha"]
    assert float(p) == pytest.approx(before - 0.5 * new_alpha * float(new_mu * velocity + 1.0))


@pytest.mark.parametrize("tuner", TUNERS)
def test_stats_has_every_field_as_python_numbers(tuner):
    model, data = make_model(), make_data()
    opt = _yf(model.parameters(), tuner)
    train(model, opt, data, steps=3)
    stats = opt.stats()
    for key in ("step", "mu", "alpha", "lr", "h_min", "h_max", "grad_var", "dist", "skipped_steps"):
        assert isinstance(stats[key], (int, float)), key
    assert stats["step"] == 3 and stats["skipped_steps"] == 0


@pytest.mark.parametrize("tuner", TUNERS)
def test_stats_lr_is_a_deprecated_alias_of_alpha(tuner):
    model, data = make_model(), make_data()
    opt = _yf(model.parameters(), tuner, lr=0.5)
    train(model, opt, data, steps=3)
    assert opt.stats()["lr"] == opt.stats()["alpha"] == float(opt.tuner_state().alpha)
    assert opt.stats()["alpha"] != 0.5  # the tuned step, not the group's multiplier


def test_stats_of_one_scope_is_always_that_tuners_record():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    grouped = YellowFin([{"params": model[0].parameters()}, {"params": model[2].parameters()}], per_group_tuning=True)
    train(model, opt, data, steps=3)
    train(model, grouped, data, steps=4)
    assert opt.stats(0) == opt.stats()
    assert [grouped.stats(i) for i in range(2)] == grouped.stats()
    assert grouped.stats(1)["step"] == 4
    for bad in (1, -1, True, "0"):
        with pytest.raises(ValueError, match=r"scope.*allowed are None or a tuner index in \[0, 1\)"):
            opt.stats(bad)


def test_options_after_lr_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        YellowFin(make_model().parameters(), 1.0, 0.9)
    assert YellowFin(make_model().parameters(), 0.5).param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("tuner", TUNERS)
def test_checkpoint_whose_tuner_holds_lr_loads_it_as_alpha(tuner):
    # Checkpoints written before the tuned step was named alpha hold it as "lr".
    model, data = make_model(), make_data()
    opt = _yf(model.parameters(), tuner)
    train(model, opt, data, steps=5)
    saved = _checkpoint_roundtrip(opt)
    saved["tuners"] = [{("lr" if name == "alpha" else name): value for name, value in record.items()}
                       for record in saved["tuners"]]
    resumed = _yf(model.parameters(), tuner)
    resumed.load_state_dict(saved)
    assert resumed.stats() == opt.stats()
    assert "alpha" in resumed.state_dict()["tuners"][0] and "lr" not in resumed.state_dict()["tuners"][0]


@pytest.mark.parametrize("tuner", TUNERS)
def test_per_group_tuning_measures_each_group_alone(tuner):
    a, b = (torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a_alone = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    grouped = _yf([{"params": [a]}, {"params": [b]}], tuner, per_group_tuning=True)
    alone = _yf([a_alone], tuner)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        g = torch.randn(3, generator=generator, dtype=torch.float64)
        a.grad, a_alone.grad = g.clone(), g.clone()
        b.grad = 100.0 * torch.randn(3, generator=generator, dtype=torch.float64)
        grouped.step()
        alone.step()
    stats = grouped.stats()
    assert isinstance(stats, list) and len(stats) == 2
    assert stats[0] == alone.stats()
    assert torch.equal(a, a_alone)
    assert stats[1]["h_max"] > 100 * stats[0]["h_max"]


def test_global_tuning_requires_shared_settings_and_per_group_allows_them():
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "beta": 0.9}]
    with pytest.raises(ValueError, match="per_group_tuning"):
        YellowFin(groups)
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "beta": 0.9}]
    opt = YellowFin(groups, per_group_tuning=True)
    assert len(opt.stats()) == 2


@pytest.mark.parametrize("tuner", TUNERS)
def test_add_param_group_after_construction(tuner):
    model, data = make_model(), make_data()
    opt = _yf(model[0].parameters(), tuner, per_group_tuning=True)
    opt.add_param_group({"params": model[2].parameters()})
    assert opt.param_groups[1]["tuner"] == tuner
    train(model, opt, data, steps=3)
    assert [s["step"] for s in opt.stats()] == [3, 3]
    model = make_model()
    opt = _yf(model[0].parameters(), tuner)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5})
    train(model, opt, data, steps=3)
    assert opt.stats()["step"] == 3


INVALID_SETTINGS = [
    ({"beta": -0.1}, "beta"),
    ({"beta": 1.0}, "beta"),
    ({"curvature_window": 0}, "curvature_window"),
    ({"curvature_window": 2.5}, "curvature_window"),
    ({"eps": 0.0}, "eps"),
    ({"lr": -1.0}, "lr"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"curvature_smoothing": "cubic"}, "curvature_smoothing"),
    ({"initial_momentum": 1.0}, "initial_momentum"),
    ({"bogus_option": 1}, "bogus_option"),
]
# The scale-free tuner's own settings (the reference refuses them whatever their value).
INVALID_SCALE_FREE_SETTINGS = [
    ({"step_rule": "adam"}, "step_rule"),
    ({"relative_clip": 0.0}, "relative_clip"),
    ({"clip_trigger": -1.0}, "clip_trigger"),
]


@pytest.mark.parametrize(
    "tuner, kwargs, name",
    [(tuner, kwargs, name) for tuner in TUNERS for kwargs, name in INVALID_SETTINGS]
    + [("scale_free", kwargs, name) for kwargs, name in INVALID_SCALE_FREE_SETTINGS],
)
def test_invalid_settings_name_the_setting_and_range(tuner, kwargs, name):
    with pytest.raises(ValueError, match=name) as error:
        _yf(make_model().parameters(), tuner, **kwargs)
    assert "allowed" in str(error.value)


def test_unknown_option_in_a_param_group_is_refused():
    with pytest.raises(ValueError, match="betta"):
        YellowFin([{"params": make_model().parameters(), "betta": 0.9}])


@pytest.mark.parametrize("tuner, options", [("reference", {"initial_lr": 0.1, "initial_momentum": 0.2}),
                                            ("scale_free", {"momentum_form": "heavy_ball"})], ids=str)
def test_momentum_offset_is_added_to_the_tuned_momentum(tuner, options):
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = _yf([p], tuner, **options)
    opt.set_momentum_offset(0.3)
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    p.grad = torch.ones(1, dtype=torch.float64)
    before = opt.state[p]["momentum_buffer"].clone()
    opt.step()
    stats = opt.stats()
    assert stats["applied_momentum"] == pytest.approx(stats["mu"] + 0.3)
    expected = stats["applied_momentum"] * before + 1.0
    assert torch.allclose(opt.state[p]["momentum_buffer"], expected)
    opt.set_momentum_offset(torch.tensor(-5.0))  # clamped into (-1, 1)
    assert opt.stats()["applied_momentum"] > -1.0


def test_paper_variant_updates_before_tuning():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = YellowFin.paper_variant([p])
    p.grad = torch.tensor([0.1, 0.2], dtype=torch.float64)
    opt.step()  # alpha_0 = 1, mu_0 = 0: the first update is a plain gradient step
    assert torch.allclose(p.detach(), torch.tensor([-0.1, -0.2], dtype=torch.float64))


def train_embedding(make_optimizer, sparse: bool, steps: int = 10):
    """An embedding trained on a fixed sequence of id batches; returns (its weight, the optimizer)."""
    torch.manual_seed(0)
    embedding = nn.Embedding(20, 4, sparse=sparse).double()
    opt = make_optimizer(embedding.parameters())
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 20, (6,), generator=generator)
        opt.zero_grad()
        (embedding(ids) ** 2).sum().backward()
        opt.step()
    return embedding.weight.detach().clone(), opt


@pytest.mark.parametrize("tuner", TUNERS)
def test_sparse_embedding_matches_dense_embedding(tuner):
    # (in heavy ball: the primal-average form takes no sparse gradient, test_sparse_gradients_run_heavy_ball_...)
    results = []
    for sparse in (False, True):
        weight, opt = train_embedding(
            lambda params: _yf(params, tuner, sparsity_correction=True, momentum_form="heavy_ball"), sparse)
        results.append((weight, opt.stats()))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    assert results[0][1]["h_max"] == pytest.approx(results[1][1]["h_max"], rel=1e-12)
    if "climb" in results[0][1]:  # (the scale-free tuner pairs a sparse gradient with the displacement at its rows)
        assert results[0][1]["climb"] != 0.0
        assert results[0][1]["climb"] == pytest.approx(results[1][1]["climb"], rel=1e-12)


def test_sparse_gradients_run_heavy_ball_where_the_form_was_left_to_its_default():
    weight, opt = train_embedding(YellowFin, sparse=True)
    heavy_ball_weight, heavy_ball = train_embedding(lambda params: YellowFin(params, momentum_form="heavy_ball"),
                                                    sparse=True)
    assert opt.param_groups[0]["momentum_form"] == "heavy_ball"
    assert opt.param_groups[0]["clip_trigger"] == heavy_ball.param_groups[0]["clip_trigger"] == pytest.approx(10.0)
    assert torch.equal(weight, heavy_ball_weight) and opt.stats() == heavy_ball.stats()
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        train_embedding(lambda params: YellowFin(params, momentum_form="primal_average"), sparse=True)


def test_dtensor_parameters_are_refused_with_a_pointer_to_the_sharded_optimizer():
    dtensor = pytest.importorskip("torch.distributed.tensor")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        created = True
    else:
        created = False
    try:
        mesh = dtensor.DeviceMesh("cpu", [0])
        param = nn.Parameter(dtensor.distribute_tensor(torch.randn(4, 3), mesh, [dtensor.Shard(0)]))
        with pytest.raises(ValueError, match="FullyShardedYellowFin"):
            YellowFin([param])
    finally:
        if created:
            dist.destroy_process_group()


PATHS = [{"foreach": False}, {"foreach": True}, {"fused": True}]


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"beta": "0.9"}, TypeError, "beta"),
        ({"eps": None}, TypeError, "eps"),
        ({"curvature_window": True}, TypeError, "curvature_window"),
        ({"curvature_window": 10**9}, ValueError, "curvature_window"),
        ({"lr": torch.tensor(float("nan"))}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"lr": "1"}, TypeError, "lr"),
        ({"per_group_tuning": "no"}, TypeError, "per_group_tuning"),
        ({"nesterov": "yes"}, TypeError, "nesterov"),
        ({"slow_start": 1}, TypeError, "slow_start"),
    ],
    ids=str,
)
def test_inputs_of_the_wrong_type_or_range_are_refused_clearly(path, kwargs, error, name, tuner):
    with pytest.raises(error, match=name) as raised:
        _yf(make_model().parameters(), tuner, **path, **kwargs)
    assert "allowed" in str(raised.value)


@pytest.mark.parametrize("path", PATHS, ids=str)
def test_the_same_tensor_twice_in_one_group_is_refused(path):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="more than once"):
        YellowFin([p, p], **path)
    opt = YellowFin([nn.Parameter(torch.zeros(2))], per_group_tuning=True, **path)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p, p]})


def _trained(tuner, steps=5, **options):
    model, data = make_model(), make_data()
    opt = _yf(model.parameters(), tuner, **options)
    train(model, opt, data, steps=steps)
    return model, opt


def _poison_tuner(field):
    def poison(saved):
        saved["tuners"][0][field] = saved["tuners"][0][field].clone()
        saved["tuners"][0][field].view(-1)[0] = float("nan")
    return poison


def _set_group(name, value):
    def change(saved):
        saved["param_groups"][0][name] = value
    return change


def _poison_buffer(saved):
    saved["state"][0]["momentum_buffer"][0, 0] = float("inf")


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize(
    "corrupt, error",
    [(_poison_tuner(field), ValueError) for field in YellowFin(make_model().parameters()).state_dict()["tuners"][0]]
    + [
        (_set_group("lr", float("nan")), ValueError),
        (_set_group("lr", torch.tensor(float("inf"))), ValueError),
        (_set_group("beta", 1.5), ValueError),
        (_set_group("beta", "0.9"), TypeError),
        (_set_group("nesterov", "yes"), TypeError),
        (_set_group("fused", True), ValueError),  # the saved group already says foreach=True
        (_set_group("betta", 0.9), ValueError),
        (_poison_buffer, ValueError),
    ],
)
def test_state_dict_with_invalid_values_is_refused_and_changes_nothing(corrupt, error, tuner):
    model, opt = _trained(tuner, foreach=True)
    saved = copy.deepcopy(_trained(tuner, steps=7, foreach=True)[1].state_dict())
    corrupt(saved)
    before, stats, groups = [t.clone() for t in flat_state(opt)], opt.stats(), copy.deepcopy(opt.param_groups)
    with pytest.raises(error):
        opt.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(before, flat_state(opt)))
    assert opt.stats() == stats
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in groups
    ]


# What a group saved without an option ran, where that is not the option's default today: before the tuner option
# existed every group ran the reference; a scale-free group saved before step_rule existed ran the secant rule, before
# relative_clip no relative clip, before clip_trigger a clip that acted at its own level (the group's relative_clip),
# before initial_distance the first move of its rule (1e-3 for the default DoWG rule), before hold_distance_uphill no
# distance hold, before momentum_form heavy ball.
RAN_BEFORE_THE_OPTION = {
    ("reference", "tuner"): "reference",
    ("reference", "momentum_form"): "heavy_ball",
    ("scale_free", "momentum_form"): "heavy_ball",
    ("scale_free", "step_rule"): "secant",
    ("scale_free", "relative_clip"): math.inf,
    ("scale_free", "clip_trigger"): 3.0,
    ("scale_free", "initial_distance"): 1e-3,
    ("scale_free", "hold_distance_uphill"): False,
    ("reference", "average"): False,
    ("scale_free", "average"): False,
}
# (the clip_trigger case saves a relative clip of its own, 3, so that "its own level" is not the default 2)
SAVED_WITH = {("scale_free", "clip_trigger"): {"relative_clip": 3.0}}
OPTIONS = sorted(YellowFin(make_model().parameters()).defaults)


def _options_of(groups):
    return [{name: value for name, value in group.items() if name != "params"} for group in groups]


# (A scale-free group always names its tuner: no scale-free checkpoint was saved before the tuner option existed.)
@pytest.mark.parametrize("tuner, option", [(tuner, option) for tuner in TUNERS for option in OPTIONS
                                           if (tuner, option) != ("scale_free", "tuner")])
def test_state_dict_saved_before_an_option_existed_loads_with_its_default_and_steps(tuner, option):
    # A checkpoint saved before ``option`` existed lacks it: it loads with the option's default, or with what the
    # group ran where that differs, into the optimizer a user resuming writes today, YellowFin(params), and steps
    # exactly as the same checkpoint naming that value does.
    # (every scale-free checkpoint saved before one of these options existed ran heavy ball)
    heavy_ball = {"momentum_form": "heavy_ball"} if tuner == "scale_free" else {}
    model, opt = _trained(tuner, **heavy_ball, **SAVED_WITH.get((tuner, option), {}))
    saved = copy.deepcopy(opt.state_dict())
    assert all(group["tuner"] == tuner for group in saved["param_groups"])
    ran = RAN_BEFORE_THE_OPTION.get((tuner, option), YellowFin(make_model().parameters()).defaults[option])
    naming = copy.deepcopy(saved)
    for old, named in zip(saved["param_groups"], naming["param_groups"]):
        del old[option]
        named[option] = ran
    resumed_model, named_model = copy.deepcopy(model), copy.deepcopy(model)
    resumed, named = YellowFin(resumed_model.parameters()), YellowFin(named_model.parameters())
    resumed.load_state_dict(saved)
    named.load_state_dict(naming)
    assert resumed.param_groups[0][option] == ran
    assert resumed.param_groups[0]["tuner"] == tuner
    assert _options_of(resumed.param_groups) == _options_of(named.param_groups)
    train(resumed_model, resumed, make_data(), steps=2)
    train(named_model, named, make_data(), steps=2)
    assert resumed.stats()["step"] == 7
    assert all(torch.isfinite(p).all() for p in resumed_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.parameters(), named_model.parameters()))
    assert resumed.stats() == named.stats()


@pytest.mark.parametrize("tuner, options", [
    (tuner, options) for tuner in TUNERS
    for options in [{"foreach": False}, {"foreach": True}, {"foreach": True, "weight_decay": 0.1}]
] + [("reference", {"foreach": True, "nesterov": True, "weight_decay": 0.1})], ids=str)
def test_complex_parameter_steps_like_its_real_view_twin(tuner, options):
    (z, opt), (twin, twin_opt) = complex_and_real_twin(tuner=tuner, **options)
    torch.testing.assert_close(torch.view_as_real(z.detach()), twin.detach(), rtol=1e-12, atol=1e-12)
    assert opt.stats() == pytest.approx(twin_opt.stats(), rel=1e-12)
    assert opt.state[z]["momentum_buffer"].dtype == torch.complex128
    if tuner == "scale_free":
        assert opt.state[z]["initial_param"].dtype == torch.complex128
        assert torch.equal(torch.view_as_real(opt.state[z]["initial_param"]), twin_opt.state[twin]["initial_param"])


def test_complex_parameter_with_sparse_gradient_is_refused_clearly():
    p = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    p.grad = torch.zeros(3, dtype=torch.complex128).to_sparse()
    with pytest.raises(ValueError, match="complex parameters with sparse gradients"):
        YellowFin([p]).step()


def test_state_dict_whose_groups_disagree_on_a_shared_tuner_is_refused():
    model = make_model()
    opt = YellowFin([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    saved = opt.state_dict()
    saved["param_groups"][1]["beta"] = 0.9
    with pytest.raises(ValueError, match="shared tuner"):
        opt.load_state_dict(saved)
    assert opt.param_groups[1]["beta"] == 0.99  # unchanged: the memory the group resolved from the tuner's default


def test_reference_variant_pins_the_authors_settings_and_takes_overrides():
    p = torch.zeros(2, requires_grad=True)
    group = YellowFin.reference_variant([p]).param_groups[0]
    pinned = dict(beta=0.999, curvature_window=20, eps=1e-6, initial_lr=1e-4, initial_momentum=0.0,
                  adaptive_clipping=True, slow_start=True, update_first=False, curvature_smoothing="log",
                  smooth_tuned=False, tuner="reference", step_rule=None, relative_clip=None, clip_trigger=None,
                  initial_distance=None, growth_cap=False, hold_distance_uphill=None)
    assert {name: group[name] for name in pinned} == pinned
    overridden = YellowFin.reference_variant([p], slow_start=False, nesterov=True).param_groups[0]
    assert overridden["slow_start"] is False and overridden["nesterov"] is True and overridden["beta"] == 0.999


def test_reference_variant_trains():
    model, data = make_model(), make_data()
    before = float(loss_of(model, data))
    train(model, YellowFin.reference_variant(model.parameters()), data, steps=300)
    assert float(loss_of(model, data)) < 0.5 * before
