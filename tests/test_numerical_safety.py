"""Non-finite gradients, extreme scales, low precision, and a step that never syncs with the host."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from yellowfin import YellowFin
from helpers import (
    flat_state, host_reads_forbidden, make_data, make_model, train, train_after_zero_gradients, train_with_scaled_loss,
)


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], [t.clone() for t in flat_state(opt)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradient_changes_nothing_and_is_counted(foreach, bad):
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), foreach=foreach, nesterov=True, weight_decay=0.1,
                    decoupled_weight_decay=True)
    train(model, opt, data, steps=5)
    params = list(model.parameters())
    snapshot = _snapshot(params, opt)
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
    # Every per-parameter buffer is untouched too.
    for a, b in zip(snapshot[1], flat_state(opt)):
        if a.shape != ():
            assert torch.equal(a, b)
    train(model, opt, data, steps=3)  # and training goes on
    assert opt.stats()["step"] == stats["step"] + 3


def test_works_under_grad_scaler():
    model, data = make_model(dtype=torch.float32), make_data(dtype=torch.float32)
    opt = YellowFin(model.parameters())
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
def test_extreme_gradient_scales_keep_everything_finite(scale, dtype, foreach):
    p = torch.randn(5, dtype=dtype, requires_grad=True)
    opt = YellowFin([p], foreach=foreach)
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


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=str)
def test_a_loss_scaled_by_1e20_neither_throws_the_parameters_nor_is_skipped(dtype, rtol):
    start = [p.detach().clone() for p in make_model(dtype=dtype).parameters()]
    runs = [train_with_scaled_loss(1e20, dtype=dtype, foreach=foreach) for foreach in (False, True)]
    for params, opt in runs:
        assert opt.stats()["skipped_steps"] == 0 and opt.stats()["step"] == 10
        # The first step is bounded by 1 / ||g|| and the tuned steps after it are as small.
        assert max(float((p - s).abs().max()) for p, s in zip(params, start)) < 1e-6
    (loop_params, loop), (foreach_params, foreach) = runs
    for a, b in zip(loop_params, foreach_params):
        torch.testing.assert_close(b, a, rtol=rtol, atol=0.0)
    assert foreach.stats()["h_max"] == pytest.approx(loop.stats()["h_max"], rel=rtol)


def test_a_huge_gradient_after_the_first_step_is_clipped():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    train(model, opt, data, steps=5)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e20)
    opt.step()
    assert max(float((p - b).abs().max()) for p, b in zip(model.parameters(), before)) < 1.0


@pytest.mark.parametrize("foreach", [False, True])
def test_all_zero_gradients_are_no_tuner_steps(foreach):
    fresh_params, fresh = train_after_zero_gradients(0, foreach=foreach)
    params, opt = train_after_zero_gradients(1000, foreach=foreach)
    assert opt.stats() == fresh.stats()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))
    assert all(torch.equal(a, b) for a, b in zip(flat_state(opt), flat_state(fresh)))


@pytest.mark.parametrize("foreach", [False, True])
def test_zeros_in_some_parameters_are_an_ordinary_step_and_per_group_scopes_decide_alone(foreach):
    a, b = (torch.ones(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    opt = YellowFin([a, b], foreach=foreach)
    a.grad, b.grad = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    opt.step()
    assert opt.stats()["step"] == 1
    grouped = YellowFin([{"params": [a]}, {"params": [b]}], per_group_tuning=True, foreach=foreach)
    grouped.step()
    assert [s["step"] for s in grouped.stats()] == [0, 1]


def test_single_scalar_parameter():
    p = nn.Parameter(torch.tensor(3.0))
    opt = YellowFin([p])
    for _ in range(200):
        opt.zero_grad()
        (p**2).backward()
        opt.step()
    assert abs(float(p.detach())) < 3.0 and torch.isfinite(p).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_parameters_stay_finite(dtype, foreach):
    model, data = make_model(dtype=dtype), make_data(dtype=dtype)
    opt = YellowFin(model.parameters(), foreach=foreach)
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
def test_property_state_stays_finite_and_skipped_steps_change_nothing(shape, steps, foreach):
    p = torch.zeros(shape, dtype=torch.float32, requires_grad=True)
    opt = YellowFin([p], foreach=foreach)
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
            for name, buffer in state["state"][0].items():  # buffers created by a skipped first step stay zero
                assert torch.equal(buffer, buffers_before.get(name, torch.zeros_like(buffer)))
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(t).all() for t in flat_state(opt))


@pytest.mark.parametrize(
    "config",
    [{}, {"foreach": False}, {"nesterov": True, "weight_decay": 1e-2}, {"clip_norm": 0.5},
     {"per_group_tuning": True}, {"sparsity_correction": True}, {"update_first": True, "smooth_tuned": True},
     {"lr": torch.tensor(0.5)}],
    ids=str,
)
def test_step_never_reads_tensors_on_the_host(config):
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters(), **config)
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
