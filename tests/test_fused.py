"""The fused (torch.compile) path: the reference's numbers, no recompilation, no host reads."""

import contextlib

import pytest
import torch
import torch._dynamo

from yellowfin import YellowFin
from helpers import complex_and_real_twin, flat_state, make_data, make_model, run_with_holes, train_after_zero_gradients, train_with_scaled_loss
from test_robustness import _host_reads_forbidden


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "dtype, rtol, options",
    [
        (torch.float64, 1e-12, {}),
        (torch.float32, 1e-6, {}),
        (torch.float64, 1e-12, {"nesterov": True, "weight_decay": 1e-2, "decoupled_weight_decay": True,
                                "maximize": True, "sparsity_correction": True}),
    ],
    ids=["float64", "float32", "float64-options"],
)
def test_fused_matches_the_per_tensor_reference(dtype, rtol, options):
    # Frozen layer, a 0-dim parameter, gradients missing on some steps, one NaN step.
    params_ref, opt_ref = run_with_holes(dtype, steps=12, nan_at=4, foreach=False, **options)
    params_fused, opt_fused = run_with_holes(dtype, steps=12, nan_at=4, fused=True, **options)
    assert opt_fused.stats()["skipped_steps"] == 1 and opt_fused.stats()["step"] == 11
    for a, b in zip(params_ref, params_fused):
        torch.testing.assert_close(b, a, rtol=rtol, atol=0.0)
    for a, b in zip(flat_state(opt_ref), flat_state(opt_fused)):
        # Buffers that pass through zero are compared to the parameters' scale.
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * 1e-3)


def _fused_training(steps, around_step):
    model, (x, y) = make_model(), make_data()
    opt = YellowFin(model.parameters(), fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if step == 3:
            model[0].weight.grad[0, 0] = float("inf")
        if step == 4:
            opt.set_momentum_offset(-0.1)
        with around_step(step):
            opt.step()
        scheduler.step()  # a new multiplier each step: a tensor to the kernels, not a constant
    assert opt.stats()["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_steps_compile_once_without_graph_breaks():
    torch._dynamo.utils.counters.clear()

    def after_the_first_step_no_recompiles(step):
        return torch._dynamo.config.patch(error_on_recompile=step > 0)

    _fused_training(8, after_the_first_step_no_recompiles)
    # A graph break would mean a data-dependent branch, i.e. a host read, inside the kernels.
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # both passes and the scalar step


def test_fused_step_code_never_reads_tensors_on_the_host():
    # Dynamo guards on the Tensor methods that the host-read guard patches, so the code of the
    # fused step is checked as it runs eagerly; the compiled graphs are checked above.
    def eager_and_host_reads_forbidden(step):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(_host_reads_forbidden())
        return stack

    _fused_training(6, eager_and_host_reads_forbidden)


def test_fused_keeps_gradients_of_norm_1e30_in_range():
    # The kernels accumulate in float64, like the reference: nothing overflows, nothing is skipped.
    p = torch.randn(5, requires_grad=True)
    opt = YellowFin([p], fused=True)
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


def test_fused_bounds_a_loss_scaled_by_1e20_like_the_reference():
    loop_params, loop = train_with_scaled_loss(1e20, dtype=torch.float32, foreach=False)
    fused_params, fused = train_with_scaled_loss(1e20, dtype=torch.float32, fused=True)
    assert fused.stats()["skipped_steps"] == 0 and fused.stats()["step"] == 10
    for a, b in zip(loop_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0.0)


def test_fused_all_zero_gradients_are_no_tuner_steps():
    fresh_params, fresh = train_after_zero_gradients(0, steps=10, fused=True)
    params, opt = train_after_zero_gradients(100, steps=10, fused=True)
    assert opt.stats() == fresh.stats()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))


def test_fused_complex_parameter_steps_like_its_real_view_twin():
    (z, opt), (twin, _) = complex_and_real_twin(steps=30, fused=True)
    torch.testing.assert_close(torch.view_as_real(z.detach()), twin.detach(), rtol=1e-12, atol=1e-12)
    assert opt.stats()["step"] == 30
