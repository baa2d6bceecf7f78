"""Non-finite gradients, extreme scales, low precision, and a step that never syncs with the host."""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from yellowfin import YellowFin
from helpers import (
    TUNERS, created_buffer, expected_buffers, flat_state, host_reads_forbidden, make_data, make_model, train,
    train_after_zero_gradients, train_with_scaled_loss,
)


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], [t.clone() for t in flat_state(opt)]


def _everything_but_the_skip_count(opt):
    """Every tensor of the state dict (per-parameter buffers and every tuner field) but the skip count."""
    sd = opt.state_dict()
    tensors = [t.clone() for index in sorted(sd["state"]) for _, t in sorted(sd["state"][index].items())]
    tensors += [t.clone() for tuner in sd["tuners"] for name, t in sorted(tuner.items()) if name != "skipped_steps"]
    return tensors


# Decoupled weight decay on both tuners; nesterov on the reference alone (the scale-free tuner refuses it).
NON_FINITE_OPTIONS = {"reference": dict(nesterov=True, weight_decay=0.1, decoupled_weight_decay=True),
                      "scale_free": dict(weight_decay=0.1, decoupled_weight_decay=True)}


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_changes_nothing_and_is_counted(foreach, bad, tuner):
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), tuner=tuner, foreach=foreach, **NON_FINITE_OPTIONS[tuner])
    train(model, opt, data, steps=5)
    params = list(model.parameters())
    snapshot = _snapshot(params, opt)
    state_before = _everything_but_the_skip_count(opt)
    stats = opt.stats()
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[0] = bad
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot[0], params))
    after = opt.stats()
    assert after["skipped_steps"] == stats["skipped_steps"] + 1
    assert {k: v for k, v in after.items() if k != "skipped_steps"} == {
        k: v for k, v in stats.items() if k != "skipped_steps"
    }
    # Every per-parameter buffer and every tuner field but the skip count is untouched too.
    state_after = _everything_but_the_skip_count(opt)
    assert len(state_after) == len(state_before)
    assert all(torch.equal(a, b) for a, b in zip(state_before, state_after))
    train(model, opt, data, steps=3)  # and training goes on
    assert opt.stats()["step"] == stats["step"] + 3


@pytest.mark.parametrize("tuner", TUNERS)
def test_works_under_grad_scaler(tuner):
    model, data = make_model(dtype=torch.float32), make_data(dtype=torch.float32)
    opt = YellowFin(model.parameters(), tuner=tuner)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # overflows at first, then backs off
    x, y = data
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = ((out.float() - y) ** 2).mean() * 1e10  # make the scaled loss overflow float32
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() < 2.0**100
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for t in flat_state(opt))
    assert opt.stats()["step"] >= 1


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("tuner", TUNERS)
def test_extreme_gradient_scales_keep_everything_finite(tuner, scale, dtype, foreach):
    p = torch.randn(5, dtype=dtype, requires_grad=True)
    opt = YellowFin([p], tuner=tuner, foreach=foreach)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        p.grad = (scale * torch.randn(5, generator=generator)).to(dtype)
        opt.step()
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(t).all() for t in flat_state(opt))
    # Every path accumulates ||g||^2 in float64 (the fused path: tests/test_passes.py), so no scale
    # overflows into a skip; an all-zero gradient is no step at all.
    assert opt.stats()["skipped_steps"] == 0
    assert opt.stats()["step"] == (0 if scale == 0.0 else 30)


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=str)
def test_a_loss_scaled_by_1e20_neither_throws_the_parameters_nor_is_skipped(dtype, rtol, tuner):
    start = [p.detach().clone() for p in make_model(dtype=dtype).parameters()]
    runs = [train_with_scaled_loss(1e20, dtype=dtype, tuner=tuner, foreach=foreach) for foreach in (False, True)]
    for foreach, (params, opt) in zip((False, True), runs):
        assert opt.stats()["skipped_steps"] == 0 and opt.stats()["step"] == 10
        if tuner == "reference":
            # The first step is bounded by 1 / ||g|| and the tuned steps after it are as small.
            assert max(float((p - s).abs().max()) for p, s in zip(params, start)) < 1e-6
        else:
            # The scale-free tuner does not see the loss scale: the trajectory is the unscaled one, to rounding
            # (tests/test_scale_free.py checks scales 1e-4 to 1e4; this one is at the edge of float32's range
            # for ||g||^2, which every path accumulates in float64). The parameters did move. In float32 the
            # multi-tensor flavour forms its dots' products in float32, which overflow here and are bounded,
            # not exact (passes.reduce_multi_tensor): there it must stay finite and train, not match.
            unscaled, _ = train_with_scaled_loss(1.0, dtype=dtype, tuner=tuner, foreach=foreach)
            assert max(float((p - s).abs().max()) for p, s in zip(unscaled, start)) > 0.1
            assert max(float((p - s).abs().max()) for p, s in zip(params, start)) > 0.1
            assert all(torch.isfinite(t).all() for t in flat_state(opt))
            if not (foreach and dtype == torch.float32):
                for a, b in zip(unscaled, params):
                    torch.testing.assert_close(b, a, rtol=rtol, atol=0.0, msg=lambda m: f"foreach={foreach}: {m}")
    (loop_params, loop), (foreach_params, foreach) = runs
    if tuner == "reference" or dtype == torch.float64:
        for a, b in zip(loop_params, foreach_params):
            torch.testing.assert_close(b, a, rtol=rtol, atol=0.0)
    assert foreach.stats()["h_max"] == pytest.approx(loop.stats()["h_max"], rel=rtol)


@pytest.mark.parametrize("tuner, form", [("reference", None), ("scale_free", "heavy_ball"), ("scale_free", None)])
def test_a_huge_gradient_after_the_first_step_is_clipped(tuner, form):
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), tuner=tuner, momentum_form=form)
    train(model, opt, data, steps=5)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in params]
    state, group = opt.tuner_state(), opt.param_groups[0]
    # The norm the gradient enters heavy ball's momentum buffer with. The reference's adaptive clipping cuts it to the
    # root of the last h_max; the scale-free tuner's relative clip (1e20 is far above clip_trigger times the running
    # RMS) to relative_clip times the root of the running mean of ||g||^2 over the steps before (debiased, t = 5 of
    # them). (The primal-average form's buffer holds z - xbar: there the move alone is checked.)
    if tuner == "reference":
        clipped_norm = math.sqrt(float(state.h_max))
    else:
        clipped_norm = group["relative_clip"] * math.sqrt(float(state.grad_sq_avg) / (1.0 - group["beta"] ** 5))
    for p in params:
        p.grad = torch.full_like(p, 1e20)
    opt.step()
    if group["momentum_form"] == "heavy_ball":
        mu = opt.stats()["applied_momentum"]
        entered = torch.cat([(opt.state[p]["momentum_buffer"] - mu * m).reshape(-1) for p, m in zip(params, momenta)])
        assert float(entered.norm()) == pytest.approx(clipped_norm, rel=1e-9)
    assert max(float((p - b).abs().max()) for p, b in zip(params, before)) < 1.0


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("foreach", [False, True])
def test_all_zero_gradients_are_no_tuner_steps(foreach, tuner):
    fresh_params, fresh = train_after_zero_gradients(0, foreach=foreach, tuner=tuner)
    params, opt = train_after_zero_gradients(1000, foreach=foreach, tuner=tuner)
    assert opt.stats() == fresh.stats()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))
    assert all(torch.equal(a, b) for a, b in zip(flat_state(opt), flat_state(fresh)))


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("foreach", [False, True])
def test_zeros_in_some_parameters_are_an_ordinary_step_and_per_group_scopes_decide_alone(foreach, tuner):
    a, b = (torch.ones(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    opt = YellowFin([a, b], tuner=tuner, foreach=foreach)
    a.grad, b.grad = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    opt.step()
    assert opt.stats()["step"] == 1
    grouped = YellowFin([{"params": [a]}, {"params": [b]}], per_group_tuning=True, tuner=tuner, foreach=foreach)
    grouped.step()
    assert [s["step"] for s in grouped.stats()] == [0, 1]


@pytest.mark.parametrize("tuner", TUNERS)
def test_single_scalar_parameter(tuner):
    p = nn.Parameter(torch.tensor(3.0))
    opt = YellowFin([p], tuner=tuner)
    for _ in range(200):
        opt.zero_grad()
        (p**2).backward()
        opt.step()
    assert abs(float(p.detach())) < 3.0 and torch.isfinite(p).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("tuner", TUNERS)
def test_low_precision_parameters_stay_finite(tuner, dtype, foreach):
    model, data = make_model(dtype=dtype), make_data(dtype=dtype)
    opt = YellowFin(model.parameters(), tuner=tuner, foreach=foreach)
    train(model, opt, data, steps=50)
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert opt.state[p]["momentum_buffer"].dtype == dtype
    assert all(torch.isfinite(t).all() for t in flat_state(opt))


gradient_entries = st.one_of(
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1e-30, -1e-30, 1e30]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([(), (1,), (3,), (2, 3)]),
    steps=st.lists(
        st.tuples(st.lists(gradient_entries, min_size=6, max_size=6), st.sampled_from([None, "nan", "inf", "-inf"])),
        min_size=1,
        max_size=6,
    ),
    foreach=st.booleans(),
)
# (found by the search: a gradient whose product with the momentum it meets exceeds float32's range, 5.2e21 * 6.5e16)
@example(shape=(), steps=[([0.0] * 6, None), ([0.0] * 6, None), ([6.5404322476720136e16] + [0.0] * 5, None),
                          ([5.202749973997538e21] + [0.0] * 5, None)], foreach=True)
# (found by the search: a gradient of float32's smallest denormal norm, whose first DoG step alpha = d / ||g|| = 7e41
# is beyond float32's range)
@example(shape=(3,), steps=[([0.0, 0.0, 1.401298464324817e-45, 0.0, 0.0, 0.0], None)], foreach=False)
@pytest.mark.parametrize("tuner", TUNERS)
def test_property_state_stays_finite_and_skipped_steps_change_nothing(tuner, shape, steps, foreach):
    p = torch.zeros(shape, dtype=torch.float32, requires_grad=True)
    opt = YellowFin([p], tuner=tuner, foreach=foreach)
    numel = p.numel()
    for values, poison in steps:
        grad = torch.tensor(values[:numel], dtype=torch.float32).reshape(shape)
        if poison is not None:
            grad.view(-1)[0] = float(poison)
        p.grad = grad
        snapshot = _snapshot([p], opt)
        tuner_before = {k: v.clone() for k, v in opt.state_dict()["tuners"][0].items()}
        buffers_before = {k: v.clone() for k, v in opt.state_dict()["state"].get(0, {}).items()}
        skipped = opt.stats()["skipped_steps"]
        opt.step()
        if poison is not None:
            assert torch.equal(snapshot[0][0], p.detach())
            assert opt.stats()["skipped_steps"] == skipped + 1
            state = opt.state_dict()
            assert state["tuners"][0]["curvatures"].equal(tuner_before["curvatures"])
            assert all(state["tuners"][0][k].equal(v) for k, v in tuner_before.items() if k != "skipped_steps")
            # Buffers created by a skipped first step hold what creation put there: zeros, and x_0 = p.
            assert set(state["state"][0]) == expected_buffers(tuner, opt)
            for name, buffer in state["state"][0].items():
                assert torch.equal(buffer, buffers_before.get(name, created_buffer(name, snapshot[0][0])))
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(t).all() for t in flat_state(opt))


@pytest.mark.parametrize("precondition", [None, "adam"])
@pytest.mark.parametrize("form", ["heavy_ball", "primal_average"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_a_step_size_beyond_the_dtypes_range_is_bounded_not_inf(dtype, form, precondition):
    # A gradient of the dtype's smallest denormal norm: the tuner's first step alpha = d / ||g|| (float64) is beyond
    # the dtype's range, while alpha g is a distance. Every flavour keeps the parameters finite (inf * 0 would be
    # NaN), and in float32 in the plain metric, where all three reduce the same sums, they agree. (In Adam's metric
    # g^2 underflows where the flavours square it in the dtype, so they differ there; finite is what they share.)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    runs = []
    for flavour in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        p = torch.tensor([100.0, 0.0, 0.0], dtype=dtype, requires_grad=True)  # (DoG's d grows with ||x_0||)
        opt = YellowFin([p], momentum_form=form, precondition=precondition, **flavour)
        for step in range(3):
            p.grad = torch.tensor([0.0, 0.0, tiny], dtype=dtype)
            opt.step()
            if step == 0 and precondition is None:
                assert float(opt.stats()["alpha"]) > torch.finfo(dtype).max  # (the tuner's own value, in float64)
        assert torch.isfinite(p).all() and all(torch.isfinite(t).all() for t in flat_state(opt))
        assert p[0] == 100.0 and p[1] == 0.0 and p[2] < 0.0
        runs.append(p.detach())
    if precondition is None and dtype == torch.float32:  # (in half precision the compiled kernels round once,
        for other in runs[1:]:                            # in float32, and the eager ones at every product)
            torch.testing.assert_close(other, runs[0], rtol=1e-2, atol=0.0)


HOST_READ_CONFIGS = [{}, {"foreach": False}, {"clip_norm": 0.5}, {"per_group_tuning": True},
                     {"sparsity_correction": True}, {"lr": torch.tensor(0.5)}]


# Nesterov and the paper's update order are the reference's alone (the scale-free tuner refuses them); the
# scale-free tuner takes weight decay without nesterov.
@pytest.mark.parametrize(
    "tuner, config",
    [("reference", config) for config in HOST_READ_CONFIGS + [{"nesterov": True, "weight_decay": 1e-2},
                                                                {"update_first": True, "smooth_tuned": True}]]
    + [("scale_free", config) for config in HOST_READ_CONFIGS + [{"weight_decay": 1e-2}]],
    ids=str,
)
def test_step_never_reads_tensors_on_the_host(tuner, config):
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), tuner=tuner, **config)
    x, y = data
    for step in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("nan")
        with host_reads_forbidden():
            opt.step()
    assert opt.stats(0)["skipped_steps"] == 1  # (one tuner in every config: one parameter group)


def test_host_read_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="host synchronisation"):
        with host_reads_forbidden():
            torch.ones(1).item()


@pytest.mark.parametrize("foreach", [False, True])
def test_a_float32_dot_that_overflows_leaves_the_state_finite_and_the_checkpoint_loadable(foreach):
    # g * v overflows float32 (1e17 * 1e22 > 3.4e38) where ||g||^2 and ||v||^2, in float64, do not: the
    # multi-tensor dot <g, v> is bounded back inside ||g|| ||v||, so the secant's running sums stay finite. (Only
    # the secant rule forms that dot.)
    p = torch.zeros((), requires_grad=True)
    opt = YellowFin([p], step_rule="secant", foreach=foreach)
    for value in (1e17, 1e22, 1.0):
        p.grad = torch.tensor(value)
        opt.step()
    assert opt.stats()["skipped_steps"] == 0 and opt.stats()["step"] == 3
    assert all(torch.isfinite(t).all() for t in flat_state(opt))
    saved = opt.state_dict()
    assert all(bool(torch.isfinite(value).all()) for value in saved["tuners"][0].values())
    YellowFin([torch.zeros((), requires_grad=True)], foreach=foreach).load_state_dict(saved)
