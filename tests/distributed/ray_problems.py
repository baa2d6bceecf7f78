"""A noisy linear regression for the Ray tests (pickled by value into the Ray workers)."""

import time

import torch
from torch import nn

from wide_problem import make_wide_model, wide_batches  # noqa: F401 (re-exported: one copy for both suites)

TRUE_WEIGHTS = torch.arange(1.0, 7.0).unsqueeze(1) / 6.0


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(6, 1)


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(worker_id: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(32, 6, generator=generator)
        yield x, x @ TRUE_WEIGHTS + 0.05 * torch.randn(32, 1, generator=generator)


def eval_loss(model) -> float:
    x, y = next(batches(-1, 12345))
    with torch.no_grad():
        return float(loss_fn(model, (x, y)))


def failing_batches(worker_id: int, seed: int):
    """Worker 1's data source breaks after a few batches."""
    for index, batch in enumerate(batches(worker_id, seed)):
        if worker_id == 1 and index == 5:
            raise ValueError("corrupt shard")
        yield batch


def slow_optimizer(params):
    """An optimizer whose construction takes a minute: the server actor answers nothing until then."""
    time.sleep(60)
    return torch.optim.SGD(params, lr=0.1)
