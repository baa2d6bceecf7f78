import pytest
import torch

from yellowfin import YellowFin
from yellowfin.asynchrony import ClosedLoopMomentum, closed_loop_offset


def test_offset_update_moves_against_the_error_and_clamps():
    assert closed_loop_offset(0.0, 0.5, 0.7, 0.1, -0.5, 0.99) == pytest.approx(-0.02)
    assert closed_loop_offset(0.0, 0.5, 0.3, 0.1, -0.5, 0.99) == pytest.approx(0.02)
    assert closed_loop_offset(-0.99, 0.5, 0.9, 1.0, -0.5, 0.99) == pytest.approx(-1.0)  # mu* + offset >= -0.5
    assert closed_loop_offset(0.4, 0.5, 0.0, 1.0, -0.5, 0.99) == pytest.approx(0.49)   # mu* + offset <= 0.99
    assert closed_loop_offset(0.1, 0.5, float("nan"), 0.1, -0.5, 0.99) == 0.1


class FakeOptimizer:
    """Exposes the YellowFin hooks the controller uses, with a moving target."""

    def __init__(self):
        self.mu = 0.6
        self.offset = 0.0

    def stats(self, scope=None):
        return {"mu": self.mu}

    def set_momentum_offset(self, value):
        self.offset = value


class AsynchronousPlant:
    """A system whose total momentum is the applied momentum plus a fixed implicit part."""

    def __init__(self, optimizer, implicit):
        self.optimizer, self.implicit = optimizer, implicit
        self.observations = 100

    @property
    def estimate(self):
        return self.optimizer.mu + self.optimizer.offset + self.implicit


@pytest.mark.parametrize("implicit", [0.3, -0.1])
def test_loop_drives_total_momentum_to_the_target(implicit):
    optimizer = FakeOptimizer()
    controller = ClosedLoopMomentum(optimizer, AsynchronousPlant(optimizer, implicit), gain=0.05)
    for step in range(600):
        optimizer.mu = 0.6 + 0.05 * (step > 300)  # the target moves half way
        controller.update()
    assert optimizer.offset == pytest.approx(-implicit, abs=1e-3)
    assert controller.applied_momentum == pytest.approx(optimizer.mu - implicit, abs=1e-3)


def test_no_correction_before_the_sensor_warms_up():
    optimizer = FakeOptimizer()
    plant = AsynchronousPlant(optimizer, 0.3)
    plant.observations = 3
    controller = ClosedLoopMomentum(optimizer, plant, gain=0.05, warmup_observations=20)
    controller.update()
    assert controller.offset == 0.0 and controller.corrections == 0


def test_drives_real_yellowfin_offset_and_state_round_trips():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = YellowFin([param])
    for _ in range(5):
        param.grad = torch.tensor([0.1, -0.2, 0.3])
        optimizer.step()
    plant = AsynchronousPlant(FakeOptimizer(), 0.0)

    class Sensor:
        observations, estimate = 50, 0.9

    controller = ClosedLoopMomentum(optimizer, Sensor(), gain=0.1)
    for _ in range(3):
        controller.update()
    stats = optimizer.stats()
    assert controller.offset < 0
    assert stats["momentum_offset"] == pytest.approx(controller.offset)
    assert stats["applied_momentum"] == pytest.approx(stats["mu"] + controller.offset)

    other = YellowFin([torch.nn.Parameter(torch.ones(3))])
    restored = ClosedLoopMomentum(other, Sensor(), gain=0.5)
    restored.load_state_dict(controller.state_dict())
    assert restored.offset == controller.offset and restored.gain == 0.1
    assert other.stats()["momentum_offset"] == pytest.approx(controller.offset)
    del plant


def test_rejects_inverted_clamps():
    with pytest.raises(ValueError):
        ClosedLoopMomentum(FakeOptimizer(), None, mu_min=0.9, mu_max=0.1)
