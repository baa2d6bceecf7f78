"""yellowfin/tuned.py: what callers outside the optimizer read of a tuner."""

import pytest
import torch

from yellowfin import YellowFin
from yellowfin.tuned import is_tuner, step_size_of, tuned_records


def _two_groups(per_group_tuning):
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = YellowFin([{"params": [first], "lr": 2.0}, {"params": [second], "lr": 0.5}],
                          per_group_tuning=per_group_tuning)
    for _ in range(3):
        first.grad, second.grad = torch.full((2,), 0.1), torch.full((3,), -0.3)
        optimizer.step()
    return optimizer


def test_global_tuning_has_one_record():
    optimizer = _two_groups(per_group_tuning=False)
    assert tuned_records(optimizer) == [optimizer.stats()] == [optimizer.stats(0)]
    assert step_size_of(optimizer) == pytest.approx(2.0 * optimizer.stats()["alpha"], rel=1e-15)


def test_per_group_tuning_gives_one_record_per_group_and_the_first_groups_step():
    optimizer = _two_groups(per_group_tuning=True)
    records = tuned_records(optimizer)
    assert records == optimizer.stats() and len(records) == 2
    assert records[0]["alpha"] != records[1]["alpha"]
    assert step_size_of(optimizer) == pytest.approx(2.0 * records[0]["alpha"], rel=1e-15)


def test_optimizers_without_a_tuner_use_their_lr():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.3)
    assert is_tuner(_two_groups(False)) and not is_tuner(sgd) and step_size_of(sgd) == 0.3
