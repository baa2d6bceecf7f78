"""yellowfin/tuned.py: one reader of ``stats()`` for every caller, whichever shape stats() has."""

import pytest
import torch

from yellowfin import YellowFin
from yellowfin.tuned import is_tuner, step_size_of, tuned_record, tuned_records


def _two_groups(per_group_tuning):
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = YellowFin([{"params": [first]}, {"params": [second], "lr": 0.5}], per_group_tuning=per_group_tuning)
    for _ in range(3):
        first.grad, second.grad = torch.full((2,), 0.1), torch.full((3,), -0.3)
        optimizer.step()
    return optimizer


def test_global_tuning_has_one_record_with_alpha_and_applied_momentum():
    optimizer = _two_groups(per_group_tuning=False)
    stats = optimizer.stats()
    record = tuned_record(optimizer)
    assert record["alpha"] == stats["lr"] and record["mu"] == stats["mu"]
    assert record["applied_momentum"] == stats.get("applied_momentum", stats["mu"])
    assert tuned_records(optimizer) == [stats]
    with pytest.raises(IndexError, match="scope must be in 0..0"):
        tuned_record(optimizer, scope=1)


def test_per_group_tuning_gives_the_group_asked_for():
    optimizer = _two_groups(per_group_tuning=True)
    stats = optimizer.stats()
    assert tuned_records(optimizer) == stats
    assert tuned_record(optimizer, scope=1)["alpha"] == stats[1]["lr"]
    assert tuned_record(optimizer)["alpha"] == stats[0]["lr"]
    assert step_size_of(optimizer) == optimizer.param_groups[0]["lr"] * stats[0]["lr"]


class _ScopedStats:
    """An optimizer with the coming ``stats(scope=None)`` and the tuned step named 'alpha'."""

    param_groups = [{"lr": 2.0}]

    def __init__(self):
        self.asked = []

    def stats(self, scope=None):
        self.asked.append(scope)
        records = [{"mu": 0.5, "alpha": 0.1, "lr": 0.1}, {"mu": 0.7, "alpha": 0.3, "lr": 0.3}]
        return records if scope is None else records[scope]

    def set_momentum_offset(self, value, scope=None):
        pass


def test_a_stats_that_takes_a_scope_is_asked_for_that_scope():
    optimizer = _ScopedStats()
    assert tuned_record(optimizer, scope=1) == {"mu": 0.7, "alpha": 0.3, "lr": 0.3, "applied_momentum": 0.7}
    assert optimizer.asked == [1]
    assert step_size_of(optimizer) == pytest.approx(0.2)


def test_optimizers_without_a_tuner_use_their_lr():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.3)
    assert not is_tuner(sgd) and step_size_of(sgd) == 0.3
