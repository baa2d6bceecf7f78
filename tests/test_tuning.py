"""The pure tuning side: the cubic, the robust region, SingleStep on exact inputs, and the step's decisions
(gates, clipping, the first-step bound, the applied momentum) on plain numbers."""

import math

import pytest
import torch

from yellowfin import tuning
from yellowfin.state import TunerSettings

# The root of (1 - x)^3 = p x to six digits, as listed in docs/algorithm.md §2.
CUBIC_ROOTS = [(1e-6, 0.990033), (1e-3, 0.903332), (0.1, 0.606997), (1.0, 0.317672), (10.0, 0.078301), (1e3, 0.000997)]


@pytest.mark.parametrize("p, expected", CUBIC_ROOTS)
def test_cubic_matches_the_documented_roots(p, expected):
    x = tuning.cubic_root(p)
    assert x.dtype == torch.float64
    assert float(x) == pytest.approx(expected, abs=5e-7)
    assert abs(float((1 - x) ** 3 - p * x)) < 1e-14


def test_cubic_accurate_from_1e_minus_12_to_1e12():
    p = torch.logspace(-12, 12, 4001, dtype=torch.float64)
    x = tuning.cubic_root(p)
    residual = (1 - x) ** 3 - p * x
    scale = torch.maximum((1 - x) ** 3, p * x)  # both sides are equal at the root
    assert torch.all(residual.abs() / scale < 1e-11)
    mu = x**2
    assert torch.all((mu >= 0) & (mu < 1))
    assert torch.all(x[1:] <= x[:-1])  # the root falls monotonically as p grows


def test_cubic_limits():
    assert float(tuning.cubic_root(0.0)) > 0.9999999  # noise dominated: sqrt(mu) -> 1
    assert float(tuning.cubic_root(1e40)) < 1e-29  # no noise: the root vanishes
    assert torch.isfinite(tuning.cubic_root(float("inf")))


def test_optimal_momentum():
    assert float(tuning.optimal_momentum(1.0)) == 0.0
    assert float(tuning.optimal_momentum(100.0)) == pytest.approx((9 / 11) ** 2)


@pytest.mark.parametrize("mu", [0.0, 0.25, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("h", [0.01, 1.0, 50.0])
def test_spectral_radius_is_sqrt_mu_inside_robust_region(mu, h):
    low, high = tuning.robust_lr_range(mu, h)
    alphas = torch.linspace(float(low), float(high), 41, dtype=torch.float64)
    radius = tuning.spectral_radius(alphas, mu, h)
    assert torch.allclose(radius, torch.full_like(radius, math.sqrt(mu)), atol=1e-6)


@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
def test_spectral_radius_exceeds_sqrt_mu_outside_robust_region(mu):
    h = 2.0
    low, high = tuning.robust_lr_range(mu, h)
    outside = torch.tensor([float(low) * 0.5, float(low) * 0.9, float(high) * 1.1, float(high) * 2], dtype=torch.float64)
    radius = tuning.spectral_radius(outside, mu, h)
    assert torch.all(radius > math.sqrt(mu) + 1e-3)


def test_spectral_radius_matches_eigenvalues():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        alpha, mu, h = torch.rand(3, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 1.0, 3.0])
        matrix = torch.tensor([[1 - alpha * h + mu, -mu], [1.0, 0.0]], dtype=torch.float64)
        expected = torch.linalg.eigvals(matrix).abs().max()
        assert float(tuning.spectral_radius(alpha, mu, h)) == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 100.0, 1e4])
def test_single_step_on_noiseless_quadratic_gives_optimal_heavy_ball(kappa):
    h_min, h_max = 0.5, 0.5 * kappa
    mu, alpha = tuning.single_step(h_min, h_max, grad_var=0.0, dist=1.0)  # C -> 0: p -> infinity
    root = math.sqrt(kappa)
    expected_mu = ((root - 1) / (root + 1)) ** 2
    assert float(mu) == pytest.approx(expected_mu, abs=1e-12)
    assert float(alpha) == pytest.approx((1 - math.sqrt(expected_mu)) ** 2 / h_min, rel=1e-12)


@pytest.mark.parametrize("kappa", [10.0, 100.0])
def test_heavy_ball_with_single_step_values_converges_at_sqrt_mu(kappa):
    curvatures = torch.linspace(1.0, kappa, 20, dtype=torch.float64)  # a diagonal quadratic
    mu, alpha = (float(v) for v in tuning.single_step(float(curvatures.min()), float(curvatures.max()), 0.0, 1.0))
    x = torch.ones_like(curvatures)
    previous = x.clone()
    distances = []
    for _ in range(400):
        x, previous = x - alpha * curvatures * x + mu * (x - previous), x
        distances.append(float(torch.linalg.vector_norm(x)))
    rate = (distances[-1] / distances[-201]) ** (1 / 200)
    assert rate == pytest.approx(math.sqrt(mu), rel=0.02)


def test_single_step_noise_dominated_gives_large_momentum_small_step():
    mu_noisy, alpha_noisy = tuning.single_step(1.0, 2.0, grad_var=1e6, dist=1.0)
    mu_clean, alpha_clean = tuning.single_step(1.0, 2.0, grad_var=1e-6, dist=1.0)
    assert float(mu_noisy) > 0.8 > float(mu_clean)
    assert float(alpha_noisy) < float(alpha_clean)


def test_slow_start_ramps_over_ten_windows():
    assert float(tuning.slow_start(1.0, 0, 20)) == pytest.approx(1 / 200)
    assert float(tuning.slow_start(1.0, 99, 20)) == pytest.approx(0.5)
    assert float(tuning.slow_start(1.0, 5000, 20)) == 1.0


def test_tune_uses_initial_values_at_first_step_and_smooths_in_paper_variant():
    estimates = (torch.tensor(1.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64),
                 torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    settings = TunerSettings(tuner="reference", initial_lr=0.3, initial_momentum=0.2)
    mu, lr = tuning.tune(estimates, 0.0, 0.2, 0.3, settings)
    assert (float(mu), float(lr)) == (0.2, 0.3)
    solved_mu, solved_lr = tuning.single_step(*estimates, eps=settings.eps)
    mu, lr = tuning.tune(estimates, 1000.0, 0.2, 0.3, settings)
    assert float(mu) == float(solved_mu) and float(lr) == float(solved_lr)
    smooth = TunerSettings(tuner="reference", smooth_tuned=True, slow_start=False, beta=0.9)
    mu, lr = tuning.tune(estimates, 5.0, 0.2, 0.3, smooth)
    assert float(mu) == pytest.approx(0.9 * 0.2 + 0.1 * float(solved_mu))
    assert float(lr) == pytest.approx(0.9 * 0.3 + 0.1 * float(solved_lr))


# --------------------------------------------------------------------------------- the step's decisions
def test_gradient_gates_skip_a_non_finite_gradient_and_pass_over_an_all_zero_one():
    def gates(sq_norm):
        return tuple(bool(gate) for gate in tuning.gradient_gates(sq_norm))

    assert gates(4.0) == (True, True)
    assert gates(1e-300) == (True, True)
    assert gates(0.0) == (True, False)  # a no-op, not a skip
    assert gates(math.inf) == (False, False)
    assert gates(math.nan) == (False, False)


def test_clip_norm_alone_scales_the_gradient_to_the_clip_norm():
    settings = TunerSettings(tuner="reference", clip_norm=2.0, adaptive_clipping=False)
    scale, update_scale = tuning.clipping_scales(100.0, 1.0, True, settings)
    assert float(scale) * 10.0 == pytest.approx(2.0) and float(update_scale) == 1.0
    scale, update_scale = tuning.clipping_scales(1.0, 1.0, True, settings)
    assert (float(scale), float(update_scale)) == (1.0, 1.0)


def test_adaptive_clipping_bounds_the_statistics_by_ten_and_the_update_by_one_sqrt_h_max():
    settings = TunerSettings(tuner="reference")
    scale, update_scale = tuning.clipping_scales(1e6, 4.0, True, settings)  # ||g|| = 1000, sqrt(h_max) = 2
    assert float(scale) * 1000.0 == pytest.approx(20.0)
    assert float(scale * update_scale) * 1000.0 == pytest.approx(2.0)
    scale, update_scale = tuning.clipping_scales(1.0, 4.0, True, settings)  # inside both bounds
    assert (float(scale), float(update_scale)) == (1.0, 1.0)
    scale, update_scale = tuning.clipping_scales(1e6, 4.0, False, settings)  # t = 0: no h_max yet
    assert (float(scale), float(update_scale)) == (1.0, 1.0)


def test_the_scale_free_relative_clip_bounds_the_update_by_the_running_root_mean_square():
    settings = TunerSettings(tuner="scale_free", relative_clip=2.0, clip_trigger=2.0)
    # ||g|| = 10 against a running mean square of 4 (rms 2): the update clipped to 2 * 2 = 4, the statistics not
    scale, update_scale = tuning.clipping_scales(100.0, 1.0, True, settings, grad_sq_mean=4.0)
    assert float(scale) == 1.0 and float(update_scale) * 10.0 == pytest.approx(4.0)
    _, update_scale = tuning.clipping_scales(9.0, 1.0, True, settings, grad_sq_mean=4.0)  # 3 < 4: left alone
    assert float(update_scale) == 1.0
    _, update_scale = tuning.clipping_scales(100.0, 1.0, False, settings, grad_sq_mean=0.0)  # t = 0: none seen
    assert float(update_scale) == 1.0
    # the same ratios at any loss scale c (||g||^2 and its mean both scale as c^2)
    _, update_scale = tuning.clipping_scales(100.0 * 1e8, 1.0, True, settings, grad_sq_mean=4.0 * 1e8)
    assert float(update_scale) * 10.0 == pytest.approx(4.0)
    # after clip_norm: relative to the norm clip_norm left (s ||g|| = 5, so s u ||g|| = 4)
    both = TunerSettings(tuner="scale_free", relative_clip=2.0, clip_trigger=2.0, clip_norm=5.0)
    scale, update_scale = tuning.clipping_scales(100.0, 1.0, True, both, grad_sq_mean=4.0)
    assert float(scale) * 10.0 == pytest.approx(5.0) and float(scale * update_scale) * 10.0 == pytest.approx(4.0)
    unclipped = TunerSettings(tuner="scale_free", relative_clip=math.inf)
    assert tuple(map(float, tuning.clipping_scales(100.0, 1.0, True, unclipped, grad_sq_mean=4.0))) == (1.0, 1.0)


def test_the_relative_clip_acts_only_above_its_trigger_which_defaults_to_the_memorys_outlier_in_heavy_ball():
    # In heavy ball the trigger is by default 1 / sqrt(1 - beta): 10 at the scale-free tuner's memory 0.99, 31.6 at
    # 0.999; in the primal-average form (the default form) the clip's own level.
    settings = TunerSettings(tuner="scale_free", momentum_form="heavy_ball")
    assert settings.clip_trigger == pytest.approx(10.0) and settings.relative_clip == 2.0
    assert TunerSettings(tuner="scale_free", beta=0.999, momentum_form="heavy_ball").clip_trigger == pytest.approx(
        1000.0**0.5)
    primal_average = TunerSettings(tuner="scale_free")
    assert primal_average.momentum_form == "primal_average" and primal_average.clip_trigger == 2.0
    # rms 2: a gradient of norm 19 (9.5 times the rms) is left alone; one of 21 (10.5 times) is cut to 2 * 2 = 4
    _, update_scale = tuning.clipping_scales(19.0**2, 1.0, True, settings, grad_sq_mean=4.0)
    assert float(update_scale) == 1.0
    _, update_scale = tuning.clipping_scales(21.0**2, 1.0, True, settings, grad_sq_mean=4.0)
    assert float(update_scale) * 21.0 == pytest.approx(4.0)
    # under asynchrony (a reported staleness) the clip acts at its own level: 5 (2.5 times the rms) is cut to 4
    _, update_scale = tuning.clipping_scales(5.0**2, 1.0, True, settings, grad_sq_mean=4.0)
    assert float(update_scale) == 1.0
    _, update_scale = tuning.clipping_scales(5.0**2, 1.0, True, settings, grad_sq_mean=4.0, staleness=1.5)
    assert float(update_scale) * 5.0 == pytest.approx(4.0)
    # a trigger below the cut's level never raises the update
    low = TunerSettings(tuner="scale_free", relative_clip=3.0, clip_trigger=2.0)
    _, update_scale = tuning.clipping_scales(5.0**2, 1.0, True, low, grad_sq_mean=4.0)
    assert float(update_scale) == 1.0
    # the clip off: no trigger either; the reference and heavy ball in Adam's metric take none, and Adam's metric's
    # default form the clip at its level, as the plain one
    assert TunerSettings(tuner="scale_free", relative_clip=math.inf).clip_trigger == math.inf
    assert TunerSettings(tuner="scale_free", precondition="adam", momentum_form="heavy_ball").clip_trigger == math.inf
    adam_form = TunerSettings(tuner="scale_free", precondition="adam")
    assert adam_form.momentum_form == "primal_average" and adam_form.relative_clip == adam_form.clip_trigger == 2.0
    assert TunerSettings(tuner="reference").clip_trigger is None
    assert TunerSettings() == primal_average  # (the default tuner is the scale-free one)
    assert TunerSettings(tuner="scale_free", precondition="adam", clip_trigger=10.0).clip_trigger == 10.0  # (taken)
    for options, error in ((dict(tuner="reference", clip_trigger=10.0), ValueError),
                           (dict(tuner="scale_free", clip_trigger=0.0), ValueError),
                           (dict(tuner="scale_free", clip_trigger=math.nan), ValueError),
                           (dict(tuner="scale_free", clip_trigger="10"), TypeError)):
        with pytest.raises(error, match="clip_trigger"):
            TunerSettings(**options)


def test_adaptive_clipping_after_clip_norm_clips_to_its_own_threshold():
    # ||g|| = 1000, clip_norm 10, sqrt(100 h_max) = 1: the statistics see norm 1 (not 1000 / 10 = 100).
    settings = TunerSettings(tuner="reference", clip_norm=10.0)
    scale, update_scale = tuning.clipping_scales(1e6, 0.01, True, settings)
    assert float(scale) * 1000.0 == pytest.approx(1.0)
    assert float(scale * update_scale) * 1000.0 == pytest.approx(0.1)


def test_first_step_bound_limits_only_an_outsized_first_step():
    assert float(tuning.bound_first_step(1.0, 1e-4, 1e40, False)) == pytest.approx(1e-36)
    assert float(tuning.bound_first_step(1.0, 1e-4, 1e40, True)) == 1.0  # t >= 1: adaptive clipping's job
    assert float(tuning.bound_first_step(0.5, 1e-4, 1.0, False)) == 0.5  # an ordinary first step


def test_applied_momentum_adds_the_offset_and_stays_inside_the_unit_interval():
    assert float(tuning.applied_momentum(0.5, 0.2, 1e-6)) == pytest.approx(0.7)
    assert float(tuning.applied_momentum(0.9, 0.5, 1e-6)) == 1.0 - 1e-6
    assert float(tuning.applied_momentum(-0.5, -0.9, 1e-6)) == -1.0 + 1e-6
