"""The estimator recursions against closed-form weighted averages computed by hand."""

import math

import pytest
import torch

from yellowfin import YellowFin
from yellowfin import measurements
from yellowfin.measurements import GradientSample, Sums, curvature_range, measure
from yellowfin.state import TunerSettings, TunerState


def debiased_average(values, beta):
    """sum_k (1 - beta) beta^(t-k) v_k / (1 - beta^(t+1)): the zero-debiased EMA, written out."""
    t = len(values) - 1
    total = sum((1 - beta) * beta ** (t - k) * v for k, v in enumerate(values))
    return total / (1 - beta ** (t + 1))


GRADIENTS = [[3.0, 0.0], [-1.0, 1.0], [2.0, -2.0], [0.5, 0.5], [4.0, 1.0], [-3.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("smoothing", ["log", "linear"])
def test_estimates_follow_hand_computation(smoothing):
    beta, window, eps = 0.6, 3, 1e-6
    param = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([param], tuner="reference", beta=beta, curvature_window=window, eps=eps, adaptive_clipping=False,
                    curvature_smoothing=smoothing)
    seen = []
    for t, g in enumerate(GRADIENTS):
        seen.append(g)
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        stats = opt.stats()

        h = [gx * gx + gy * gy for gx, gy in seen]
        window_max = [max(h[max(0, k - window + 1): k + 1]) for k in range(len(h))]
        window_min = [min(h[max(0, k - window + 1): k + 1]) for k in range(len(h))]
        if smoothing == "log":
            h_max = math.exp(debiased_average([math.log(v + eps) for v in window_max], beta))
            h_min = math.exp(debiased_average([math.log(v + eps) for v in window_min], beta))
        else:
            h_max, h_min = debiased_average(window_max, beta), debiased_average(window_min, beta)
        mean_grad = [debiased_average([g_[i] for g_ in seen], beta) for i in range(2)]
        variance = max(eps, debiased_average(h, beta) - sum(m * m for m in mean_grad))
        distances = [
            debiased_average([math.sqrt(v) for v in h[: k + 1]], beta) / (debiased_average(h[: k + 1], beta) + eps)
            for k in range(len(h))
        ]
        assert stats["step"] == t + 1
        assert stats["h_max"] == pytest.approx(h_max, rel=1e-12)
        assert stats["h_min"] == pytest.approx(h_min, rel=1e-12)
        assert stats["grad_var"] == pytest.approx(variance, rel=1e-10)
        assert stats["dist"] == pytest.approx(debiased_average(distances, beta), rel=1e-12)


def test_constant_gradient_has_no_variance_and_exact_curvature():
    param = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = YellowFin([param], tuner="reference", adaptive_clipping=False)
    for _ in range(30):
        param.grad = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
        opt.step()
    stats = opt.stats()
    assert stats["h_min"] == pytest.approx(9.0 + 1e-6, rel=1e-12)
    assert stats["h_max"] == pytest.approx(9.0 + 1e-6, rel=1e-12)
    assert stats["grad_var"] == pytest.approx(1e-6, abs=1e-9)
    assert stats["dist"] == pytest.approx(3.0 / (9.0 + 1e-6), rel=1e-9)


def test_curvature_range_ignores_unfilled_slots():
    buffer = torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    low, high = curvature_range(buffer, torch.tensor(0.0, dtype=torch.float64))
    assert (float(low), float(high)) == (5.0, 5.0)
    low, high = curvature_range(torch.tensor([5.0, 2.0, 7.0, 1.0], dtype=torch.float64),
                                torch.tensor(10.0, dtype=torch.float64))
    assert (float(low), float(high)) == (1.0, 7.0)


def test_sparsity_correction_scales_estimates_by_density():
    settings = TunerSettings(tuner="reference", beta=0.5, sparsity_correction=True)
    dense_settings = TunerSettings(tuner="reference", beta=0.5)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    state = TunerState.initial(settings)
    sample = GradientSample(f64(4.0), f64(1.0), f64(0.25))
    _, sparse = measure(state, sample, settings)
    _, dense = measure(TunerState.initial(dense_settings), sample, dense_settings)
    assert float(sparse.h_min) == pytest.approx(0.25 * float(dense.h_min))
    assert float(sparse.h_max) == pytest.approx(0.25 * float(dense.h_max))
    assert float(sparse.grad_var) == pytest.approx(0.25 * float(dense.grad_var))
    assert float(sparse.dist) == pytest.approx(float(dense.dist) / (0.5 + 1e-6))


@pytest.mark.parametrize("tuner", ["reference", "scale_free"])
def test_density_counts_nonzero_entries(tuner):
    param = torch.zeros(8, requires_grad=True)
    opt = YellowFin([param], tuner=tuner, sparsity_correction=True, beta=0.0, adaptive_clipping=False)
    param.grad = torch.tensor([1.0, 0, 0, 0, 2.0, 0, 0, 0])
    opt.step()
    assert float(opt.tuner_state().density_avg) == pytest.approx(0.25)


def test_averaged_sq_norm_equals_the_norm_of_the_updated_average():
    generator = torch.Generator().manual_seed(3)
    grad_avg, grad = torch.randn(50, dtype=torch.float64, generator=generator), torch.randn(50, dtype=torch.float64, generator=generator)
    decay, weight = torch.tensor(0.999, dtype=torch.float64), torch.tensor(0.001 * 0.7, dtype=torch.float64)
    value = measurements.averaged_sq_norm(grad_avg @ grad_avg, grad_avg @ grad, grad @ grad, decay, weight)
    expected = torch.sum((decay * grad_avg + weight * grad) ** 2)
    torch.testing.assert_close(value, expected, rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("cross", [float("inf"), float("-inf"), float("nan")])
def test_averaged_sq_norm_bounds_an_overflowed_cross_term(cross):
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    value = measurements.averaged_sq_norm(f64(4.0), f64(cross), f64(9.0), f64(1.0), f64(1.0))
    # |<a, b>| <= ||a|| ||b|| = 6, so the result lies in [(3 - 2)^2, (3 + 2)^2]; NaN reads as 0.
    expected = {"inf": 25.0, "-inf": 1.0, "nan": 13.0}[str(cross)]
    assert value.item() == expected


def test_the_leads_product_is_divided_by_the_groups_lr_given_as_a_number_or_a_tensor():
    sums = Sums.zeros(torch.zeros(()))._replace(grad_dot_momentum=torch.tensor(3.0, dtype=torch.float64),
                                                sq_norm=torch.tensor(5.0, dtype=torch.float64))
    for lr in (0.5, torch.tensor([0.5], dtype=torch.float32)):
        divided = sums.lead_per_lr(lr)
        assert float(divided.grad_dot_momentum) == 6.0 and divided.sq_norm is sums.sq_norm  # (only that sum)
    for lr in (0.0, torch.tensor(0.0)):  # (a group that stands still adds nothing)
        assert float(sums.lead_per_lr(lr).grad_dot_momentum) == 0.0
