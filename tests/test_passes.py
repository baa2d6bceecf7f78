"""The passes over the tensors (yellowfin/passes.py): every flavour gives the single-tensor reference's
numbers, the reference keeps its recorded trajectories, and the compiled flavour compiles once and never
reads a tensor on the host."""

import contextlib

import pytest
import torch
import torch._dynamo

from yellowfin import YellowFin
from helpers import (
    TUNERS, complex_and_real_twin, flat_state, host_reads_forbidden, make_data, make_model, run_with_holes,
    train_after_zero_gradients, train_with_scaled_loss,
)


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    # (every compiled test starts from an empty cache, so "compiles once" means what it says)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def quadratic_trajectory(steps=50, **options):
    """The parameters after ``steps`` single-tensor reference steps on a noisy separable quadratic
    (elementwise arithmetic on tensors of at most three entries: no BLAS, no vectorised sums)."""
    curvatures = [torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64),
                  torch.tensor([0.5, 2.0], dtype=torch.float64)]
    params = [torch.ones_like(h).requires_grad_() for h in curvatures]
    opt = YellowFin.reference_variant([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], foreach=False,
                                      **options)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p, h in zip(params, curvatures):
            p.grad = h * p.detach() + 0.1 * torch.randn(h.shape, dtype=torch.float64, generator=generator)
        opt.step()
    return [float(v) for p in params for v in p.detach().reshape(-1)]


# Recorded before the passes moved into yellowfin/passes.py (and bit-identical after it, on the machine
# that recorded them). Compared to 1e-13: transcendental functions and reductions may round differently
# on another CPU; a change of the algorithm moves these numbers far more.
RECORDED_TRAJECTORIES = {
    "reference": [
        "0x1.e0e9d6bebc1b4p-1", "0x1.12dfddce06f4ap-1", "0x1.fc2b21593621cp-1",
        "0x1.a93f5eab61f1ap-1", "0x1.f87db68b491acp-1", "0x1.e1ccfa2a59d27p-1",
    ],
    "nesterov-decoupled": [
        "0x1.ddec0bdc2be50p-1", "0x1.10f6d25490e0cp-1", "0x1.f90c51e23e547p-1",
        "0x1.a688e4f549a13p-1", "0x1.f6ef4c47a0c81p-1", "0x1.e049607eb0fb6p-1",
    ],
    "coupled-clip": [
        "-0x1.1f6e4855069acp-6", "0x1.81cc22923c122p-4", "0x1.ee17ff1af3dbfp-4",
        "-0x1.d2b43dab8cac6p-6", "0x1.1658f549d8630p-3", "0x1.26c0aab926fc1p-5",
    ],
    "paper": [
        "0x1.e9dc96e245c86p-5", "-0x1.5bbcd7c88c3ecp-10", "0x1.862a2b900fe14p-1",
        "-0x1.593204e58feb4p-8", "0x1.1b95c3865db73p-1", "0x1.72c97e739641cp-4",
    ],
    "per-group-sparsity": [
        "0x1.df7916d867a8dp-1", "0x1.0ac6052cfc14ap-1", "0x1.fbfc2443dc2fbp-1",
        "0x1.a57e62a5ab9a4p-1", "0x1.3ff32cbbf0ff6p-1", "0x1.30e95b5b63d1ep-3",
    ],
}
TRAJECTORY_OPTIONS = {
    "reference": {},
    "nesterov-decoupled": dict(nesterov=True, weight_decay=0.1, decoupled_weight_decay=True),
    "coupled-clip": dict(weight_decay=0.1, clip_norm=0.5),
    "paper": dict(update_first=True, curvature_smoothing="linear", smooth_tuned=True, slow_start=False,
                  adaptive_clipping=False, initial_lr=0.05),
    "per-group-sparsity": dict(per_group_tuning=True, sparsity_correction=True),
}


@pytest.mark.parametrize("name", sorted(TRAJECTORY_OPTIONS))
def test_the_reference_keeps_its_recorded_trajectories(name):
    values = quadratic_trajectory(**TRAJECTORY_OPTIONS[name])
    expected = [float.fromhex(value) for value in RECORDED_TRAJECTORIES[name]]
    assert values == pytest.approx(expected, rel=1e-13, abs=0.0)


@pytest.mark.parametrize("tuner", TUNERS)
def test_multi_tensor_matches_the_single_tensor_reference(tuner):
    params_loop, opt_loop = run_with_holes(foreach=False, tuner=tuner)
    params_fast, opt_fast = run_with_holes(foreach=True, tuner=tuner)
    for a, b in zip(params_loop, params_fast):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(flat_state(opt_loop), flat_state(opt_fast)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert opt_loop.stats()["step"] == 25


FUSED_OPTIONS = {"weight_decay": 1e-2, "decoupled_weight_decay": True, "maximize": True, "sparsity_correction": True}


# Nesterov is the reference's alone (the scale-free tuner refuses it): the scale-free tuner takes the other options.
@pytest.mark.parametrize(
    "tuner, dtype, rtol, options",
    [
        (tuner, dtype, rtol, options) for tuner in TUNERS for dtype, rtol, options in (
            (torch.float64, 1e-12, {}),
            (torch.float32, 1e-6, {}),
            (torch.float64, 1e-12, {**FUSED_OPTIONS, "nesterov": True} if tuner == "reference" else FUSED_OPTIONS),
        )
    ],
    ids=[f"{tuner}-{case}" for tuner in TUNERS for case in ("float64", "float32", "float64-options")],
)
def test_fused_matches_the_per_tensor_reference(tuner, dtype, rtol, options):
    # Frozen layer, a 0-dim parameter, gradients missing on some steps, one NaN step.
    params_ref, opt_ref = run_with_holes(dtype, steps=12, nan_at=4, foreach=False, tuner=tuner, **options)
    params_fused, opt_fused = run_with_holes(dtype, steps=12, nan_at=4, fused=True, tuner=tuner, **options)
    assert opt_fused.stats()["skipped_steps"] == 1 and opt_fused.stats()["step"] == 11
    for a, b in zip(params_ref, params_fused):
        torch.testing.assert_close(b, a, rtol=rtol, atol=0.0)
    for a, b in zip(flat_state(opt_ref), flat_state(opt_fused)):
        # Buffers that pass through zero are compared to the parameters' scale.
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * 1e-3)


# The tuners that fused=True runs, by name: the two, and the scale-free one in Adam's metric (its numbers are
# checked against its reference in tests/test_preconditioned.py).
FUSED_TUNERS = {"reference": dict(tuner="reference"), "scale_free": dict(tuner="scale_free"),
                "preconditioned": dict(tuner="scale_free", precondition="adam"),
                "primal_average": dict(tuner="scale_free", momentum_form="primal_average")}


def _fused_training(steps, around_step, tuner, bad=float("inf")):
    model, (x, y) = make_model(), make_data()
    opt = YellowFin(model.parameters(), **FUSED_TUNERS[tuner], fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if step == 3:
            model[0].weight.grad[0, 0] = bad
        if step == 4:
            opt.set_momentum_offset(-0.1)
        with around_step(step):
            opt.step()
        scheduler.step()  # a new multiplier each step: a tensor to the kernels, not a constant
    assert opt.stats()["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# (a NaN gradient makes NaN sums, which the scalar step must take without recompiling, as it takes Inf ones)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("tuner", sorted(FUSED_TUNERS))
def test_fused_steps_compile_once_without_graph_breaks(tuner, bad):
    torch._dynamo.utils.counters.clear()

    def after_the_first_step_no_recompiles(step):
        return torch._dynamo.config.patch(error_on_recompile=step > 0)

    _fused_training(8, after_the_first_step_no_recompiles, tuner, bad)
    # A graph break would mean a data-dependent branch, i.e. a host read, inside the kernels. (Inside their loop over
    # the tensors dynamo does not split the graph but runs the whole kernel eagerly: "unimplemented", a frame not ok.)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and not counters["unimplemented"]
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    assert counters["stats"]["unique_graphs"] >= 3  # both passes and the scalar step


@pytest.mark.parametrize("tuner", sorted(FUSED_TUNERS))
def test_fused_step_code_never_reads_tensors_on_the_host(tuner):
    # Dynamo guards on the Tensor methods that the host-read guard patches, so the code of the
    # fused step is checked as it runs eagerly; the compiled graphs are checked above.
    def eager_and_host_reads_forbidden(step):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(host_reads_forbidden())
        return stack

    _fused_training(6, eager_and_host_reads_forbidden, tuner)


@pytest.mark.parametrize("tuner", TUNERS)
def test_fused_keeps_gradients_of_norm_1e30_in_range(tuner):
    # The kernels accumulate in float64, like the reference: nothing overflows, nothing is skipped.
    p = torch.randn(5, requires_grad=True)
    opt = YellowFin([p], tuner=tuner, fused=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        p.grad = 1e30 * torch.randn(5, generator=generator)
        opt.step()
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(t).all() for t in flat_state(opt))
    assert opt.stats()["skipped_steps"] == 0 and opt.stats()["step"] == 12


def test_fused_and_foreach_together_are_refused():
    with pytest.raises(ValueError, match="foreach=True and fused=True"):
        YellowFin(make_model().parameters(), foreach=True, fused=True)


@pytest.mark.parametrize("tuner", TUNERS)
def test_fused_bounds_a_loss_scaled_by_1e20_like_the_reference(tuner):
    loop_params, loop = train_with_scaled_loss(1e20, dtype=torch.float32, foreach=False, tuner=tuner)
    fused_params, fused = train_with_scaled_loss(1e20, dtype=torch.float32, fused=True, tuner=tuner)
    assert fused.stats()["skipped_steps"] == 0 and fused.stats()["step"] == 10
    for a, b in zip(loop_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("tuner", sorted(FUSED_TUNERS))
def test_fused_all_zero_gradients_are_no_tuner_steps(tuner):
    fresh_params, fresh = train_after_zero_gradients(0, steps=10, fused=True, **FUSED_TUNERS[tuner])
    params, opt = train_after_zero_gradients(100, steps=10, fused=True, **FUSED_TUNERS[tuner])
    assert opt.stats() == fresh.stats()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))


@pytest.mark.parametrize("tuner", sorted(FUSED_TUNERS))
def test_fused_complex_parameter_steps_like_its_real_view_twin(tuner):
    (z, opt), (twin, _) = complex_and_real_twin(steps=30, fused=True, **FUSED_TUNERS[tuner])
    torch.testing.assert_close(torch.view_as_real(z.detach()), twin.detach(), rtol=1e-12, atol=1e-12)
    assert opt.stats()["step"] == 30
