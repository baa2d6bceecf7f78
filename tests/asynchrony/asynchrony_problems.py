"""Small synthetic problems for the asynchrony tests (module-level so worker processes can use them)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from wide_problem import make_wide_model, wide_batches  # noqa: F401 (re-exported: one copy for both suites)

DIM = 64
CURVATURES = torch.logspace(-2, 0, DIM)


class DiagonalQuadratic(nn.Module):
    """f(x) = 1/2 sum_i h_i x_i^2 (+ a linear noise term supplied by the batch)."""

    def __init__(self, seed: int = 0, dim: int = DIM):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.x = nn.Parameter(torch.randn(dim, generator=generator))


def quadratic_loss(model: DiagonalQuadratic, noise: torch.Tensor) -> torch.Tensor:
    h = CURVATURES[: model.x.numel()]
    return 0.5 * (h * model.x ** 2).sum() + (noise * model.x).sum()


def noise_batches(scale: float, seed: int, dim: int = DIM):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield scale * torch.randn(dim, generator=generator)


TRUE_WEIGHTS = torch.randn(4, 8, generator=torch.Generator().manual_seed(123))


def make_regression_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(8, 4)


def regression_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def regression_batches(worker_id: int, seed: int):
    # The targets carry a little noise: without it the model fits them exactly (within ~300 steps of the default
    # tuner), its gradients become exactly zero, and a zero gradient is no step for the tuner (it counts none), so
    # the tests that match the tuner's step count to the updates applied would depend on how many ran.
    generator = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(16, 8, generator=generator)
        yield x, x @ TRUE_WEIGHTS.T + 0.01 * torch.randn(16, 4, generator=generator)


def poisoned_batches(worker_id: int, seed: int):
    """Worker 0 produces NaN gradients every other batch; the others are healthy."""
    healthy = regression_batches(worker_id, seed)
    count = 0
    while True:
        x, y = next(healthy)
        count += 1
        if worker_id == 0 and count % 2 == 0:
            x = x.clone()
            x[0, 0] = float("nan")
        yield x, y


def regression_eval_loss(model: nn.Module) -> float:
    with torch.no_grad():
        batch = next(regression_batches(0, 999))
        return float(regression_loss(model, batch))


def failing_loss(model: nn.Module, batch) -> torch.Tensor:
    """A loss function with a bug: it raises every time."""
    raise ValueError("the loss exploded on purpose")


def assert_all_gone(pids) -> None:
    """Every process in ``pids`` has exited and been reaped (a zombie would still answer signal 0, and the
    systems join their children, so any answer is a leak)."""
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"worker process {pid} is still alive")
