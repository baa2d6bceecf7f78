import math

import pytest
import torch

from asynchrony_problems import DIM, DiagonalQuadratic, noise_batches, quadratic_loss
from yellowfin.asynchrony.sensor import (MomentumSensor, lr_outside_correction, median_ratio,
                                         momentum_residual, random_coordinate_subset)
from yellowfin.asynchrony.simulator import StalenessSimulator


def test_residual_recovers_heavy_ball_momentum_exactly():
    x_prev, x_s, g = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 2.5, -0.5]), torch.tensor([0.3, -1.0, 2.0])
    mu, alpha = 0.6, 0.1
    x_next = x_s + mu * (x_s - x_prev) - alpha * g
    numerator, denominator = momentum_residual(x_prev, x_s, x_next, g, alpha)
    assert torch.allclose(numerator / denominator, torch.full((3,), mu))


def test_median_ignores_outliers_and_zero_denominators():
    numerator = torch.tensor([0.5, 0.5, 0.5, 100.0, 1.0])
    denominator = torch.tensor([1.0, 1.0, 1.0, 1e-3, 0.0])
    assert median_ratio(numerator, denominator) == pytest.approx(0.5)
    assert math.isnan(median_ratio(torch.zeros(3), torch.zeros(3)))


def test_lr_outside_correction():
    assert lr_outside_correction(0.2, 0.1) == pytest.approx(2.0)
    assert lr_outside_correction(0.1, 0.0) == 1.0


def test_subset_is_deterministic_and_within_range():
    a, b = random_coordinate_subset(1000, 50, seed=3), random_coordinate_subset(1000, 50, seed=3)
    assert torch.equal(a, b) and a.numel() == 50 and int(a.max()) < 1000
    assert random_coordinate_subset(10, 50, seed=0).numel() == 10


def _run(optimizer_fn, num_workers, staleness, steps, noise, sensors, seed=0, scheduler_fn=None):
    model = DiagonalQuadratic(seed)
    optimizer = optimizer_fn(model.parameters())
    scheduler = scheduler_fn(optimizer) if scheduler_fn else None
    sim = StalenessSimulator(model, optimizer, num_workers, staleness, seed=seed, sensors=sensors)
    batches = noise_batches(noise, seed + 1)
    for _ in range(steps):
        sim.step(quadratic_loss, next(batches))
        if scheduler is not None:
            scheduler.step()
    return sim


def test_synchronous_momentum_sgd_returns_its_momentum():
    sensor = MomentumSensor(DIM, 32)
    _run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.7), 1, "none", 200, 0.0, [sensor])
    assert sensor.averaged == pytest.approx(0.7, abs=1e-4)
    assert sensor.instant == pytest.approx(0.7, abs=1e-4)


def test_synchronous_with_changing_lr_needs_the_lr_outside_correction():
    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.97)

    corrected, raw = MomentumSensor(DIM, 32), MomentumSensor(DIM, 32, lr_outside=False)
    _run(lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5), 1, "none", 100, 0.0, [corrected, raw],
         scheduler_fn=schedule)
    assert corrected.averaged == pytest.approx(0.5, abs=1e-4)
    assert raw.averaged == pytest.approx(0.5 * 0.97, abs=1e-3)  # mu * alpha_s / alpha_{s-1}


def test_time_averaging_handles_noisy_gradients():
    sensor = MomentumSensor(DIM, 64, beta=0.995)
    _run(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8), 1, "none", 1500, 0.05, [sensor])
    assert sensor.averaged == pytest.approx(0.8, abs=0.03)


@pytest.mark.parametrize("num_workers", [2, 4, 8])
def test_effective_step_sensor_finds_one_minus_one_over_m_under_geometric_staleness(num_workers):
    """docs/asynchrony.md §1-§2: noise-free, slow dynamics, explicit momentum 0, sensing with alpha / M."""
    effective = MomentumSensor(DIM, 48, step_scale=1.0 / num_workers)
    algorithmic = MomentumSensor(DIM, 48)
    _run(lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.0), num_workers, "geometric", 2500, 0.0,
         [effective, algorithmic])
    assert effective.averaged == pytest.approx(1 - 1 / num_workers, abs=0.03)
    # With the algorithmic step the excess over mu = 0 is small: it scales with alpha x curvature.
    assert 0.0 < algorithmic.averaged < 0.2


def test_stale_applied_gradient_hides_asynchrony():
    """Fed the gradient *applied* at step s (stale), the residual is exactly the algorithmic mu; fed the
    gradient evaluated at x_s, as docs/asynchrony.md §2 requires, the sensor sees the extra momentum of
    staleness."""
    h = torch.logspace(-2, 0, DIM, dtype=torch.float64)
    mu, alpha, tau = 0.3, 0.1, 3
    x = [torch.linspace(-1, 1, DIM, dtype=torch.float64)]
    velocity = torch.zeros(DIM, dtype=torch.float64)
    applied = []
    for s in range(400):
        stale_grad = h * x[max(0, s - tau)]
        applied.append(stale_grad)
        velocity = mu * velocity + stale_grad
        x.append(x[s] - alpha * velocity)
    wrong, right = MomentumSensor(DIM, DIM), MomentumSensor(DIM, DIM)
    for s in range(1, 399):
        wrong.observe_triplet(x[s - 1], x[s], x[s + 1], applied[s], alpha)
        right.observe_triplet(x[s - 1], x[s], x[s + 1], h * x[s], alpha)
    assert wrong.averaged == pytest.approx(mu, abs=1e-9)
    assert right.averaged > mu + 0.01


def test_state_dict_round_trip():
    sensor = MomentumSensor(DIM, 32, step_scale=0.25)
    _run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.6), 1, "none", 50, 0.01, [sensor])
    restored = MomentumSensor(DIM, 8, seed=99)
    restored.load_state_dict(sensor.state_dict())
    assert torch.equal(restored.subset, sensor.subset)
    assert restored.averaged == sensor.averaged and restored.observations == sensor.observations
    assert restored.step_scale == 0.25
