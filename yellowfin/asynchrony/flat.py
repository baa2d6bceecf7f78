"""Flat views: a model's parameters (or gradients) as one vector, in ``model.parameters()`` order, and
back. Every asynchronous system moves models and gradients between processes in this form, computes a
worker's gradient with :func:`loss_and_flat_gradient`, and checks a pushed gradient with
:func:`gradient_problem` before it touches a model."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor


def flat_parameters(params: Iterable[Tensor]) -> Tensor:
    """The parameters' values as one new vector (detached from autograd). Not
    ``torch.nn.utils.parameters_to_vector``: that one refuses a non-contiguous parameter."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def flat_gradients(params: Iterable[Tensor]) -> Tensor:
    """The gradients as one new vector; a parameter without a gradient contributes zeros."""
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if p.grad is None
                      else p.grad.detach().reshape(-1) for p in params])


def loss_and_flat_gradient(loss_fn, model, params: list[Tensor], batch) -> tuple[Tensor, float]:
    """Backpropagate ``loss_fn(model, batch)`` from cleared gradients; return the gradient of ``params``
    as one new vector, and the loss as a float. What every worker, real or simulated, computes."""
    for p in params:
        p.grad = None
    loss = loss_fn(model, batch)
    loss.backward()
    return flat_gradients(params), float(loss.detach())


def split_like(flat: Tensor, params: Iterable[Tensor]) -> Iterator[Tensor]:
    """Views of consecutive pieces of ``flat``, each shaped like the next parameter."""
    offset = 0
    for p in params:
        n = p.numel()
        yield flat[offset:offset + n].view_as(p)
        offset += n


def load_parameters(params: Iterable[Tensor], flat: Tensor) -> None:
    """Copy ``flat`` into the parameters in place (they keep their storage, shared memory included;
    ``torch.nn.utils.vector_to_parameters`` would re-point them at ``flat`` instead)."""
    params = list(params)
    with torch.no_grad():
        for p, piece in zip(params, split_like(flat, params)):
            p.copy_(piece)


def load_gradients(params: Iterable[Tensor], flat_grad: Tensor) -> None:
    """Set each parameter's ``.grad`` to its piece of ``flat_grad`` (copied: the parameter owns it)."""
    params = list(params)
    for p, piece in zip(params, split_like(flat_grad, params)):
        piece = piece.to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)


def gradient_problem(grad, numel: int, dtype: np.dtype) -> str | None:
    """Why a pushed flat gradient (a numpy array) must be rejected, or None if it is fine."""
    if not isinstance(grad, np.ndarray):
        return f"gradient is a {type(grad).__name__}, expected a numpy array"
    if grad.dtype != dtype:
        return f"gradient dtype {grad.dtype} != model dtype {dtype}"
    if grad.shape != (numel,):
        return f"gradient shape {grad.shape} != ({numel},)"
    if not np.isfinite(grad).all():
        return "gradient contains NaN or Inf"
    return None
