"""The fused path: YellowFin's two passes as ``torch.compile``d kernels (``YellowFin(fused=True)``).

Pass 1 reads g and gbar once and returns ||g||^2, <gbar, g>, ||gbar||^2 (and the non-zero count),
accumulated in float64 inside the kernel, so it costs what a float32 read costs and keeps the
reference path's range (gradients of norm 1e30 included). Pass 2 reads g, gbar, v, x once and
writes gbar, v, x. Every coefficient is a 0-dim tensor, so the tuned values change without
recompiling; a skipped step is a ``where`` inside the kernel instead of a copy of the gradient.

Tensors go to the kernels in chunks of at most ``CHUNK`` so that compile time stays bounded for
models with hundreds of parameters: after the first chunk, dynamo's automatic dynamic shapes
let the other chunks reuse one kernel whatever their sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 32


def _sums(grads: list[Tensor], grad_avgs: list[Tensor], count_nonzero: bool) -> Tensor:
    total = None
    for grad, grad_avg in zip(grads, grad_avgs):
        g, a = grad.to(torch.float64), grad_avg.to(torch.float64)
        nonzero = (grad != 0).sum().to(torch.float64) if count_nonzero else g.new_zeros(())
        row = torch.stack([(g * g).sum(), (g * a).sum(), (a * a).sum(), nonzero])
        total = row if total is None else total + row
    return total


def _update(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], momenta: list[Tensor],
    finite: Tensor, avg_decay: Tensor, avg_weight: Tensor, momentum: Tensor, grad_scale: Tensor,
    step_size: Tensor, shrink: Tensor, nesterov: bool,
) -> None:
    for param, grad, grad_avg, momentum_buffer in zip(params, grads, grad_avgs, momenta):
        g = torch.where(finite, grad, 0.0)
        grad_avg.copy_(grad_avg * avg_decay + g * avg_weight)
        scaled = g * grad_scale
        v = momentum_buffer * momentum + scaled
        momentum_buffer.copy_(v)
        direction = scaled + v * momentum if nesterov else v
        param.copy_(param * shrink - step_size * direction)


_compiled_sums = torch.compile(_sums)
_compiled_update = torch.compile(_update)


def _chunks(count: int):
    return (slice(start, start + CHUNK) for start in range(0, count, CHUNK))


def _at_least_1d(tensors: list[Tensor]) -> list[Tensor]:
    # Inductor (torch 2.13, CPU) drops in-place writes to 0-dim tensor inputs; a 1-element view keeps them.
    return [t.view(1) if t.dim() == 0 else t for t in tensors]


def reduce_sums(grads: list[Tensor], grad_avgs: list[Tensor], count_nonzero: bool) -> Tensor:
    """float64 [||g||^2, <gbar, g>, ||gbar||^2, non-zeros] over dense tensors of one device."""
    grads, grad_avgs = _at_least_1d(grads), _at_least_1d(grad_avgs)
    total = None
    for part in _chunks(len(grads)):
        row = _compiled_sums(grads[part], grad_avgs[part], count_nonzero)
        total = row if total is None else total + row
    return total


def update(params, grads, grad_avgs, momenta, finite, avg_decay, avg_weight, momentum, grad_scale,
           step_size, shrink, nesterov: bool) -> None:
    """gbar <- avg_decay gbar + avg_weight g;  v <- momentum v + grad_scale g;
    x <- shrink x - step_size (v, or its Nesterov form), in place (shrink: decoupled weight decay)."""
    params, grads, grad_avgs, momenta = map(_at_least_1d, (params, grads, grad_avgs, momenta))
    for part in _chunks(len(params)):
        _compiled_update(params[part], grads[part], grad_avgs[part], momenta[part], finite, avg_decay,
                         avg_weight, momentum, grad_scale, step_size, shrink, nesterov)
