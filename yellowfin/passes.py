"""Apply: the two passes of a step over the tensors, in three flavours (docs/algorithm.md §4).

Pass 1, ``reduce_*``, reads g and gbar (and for the scale-free tuner x, x_0 and v, a ``Trajectory``) and
writes nothing: it returns their ``Sums`` as one float64 vector (``measurements.Sums`` defines its layout).
Pass 2, ``update_*``, reads g, gbar, v, x once and writes gbar, v, x with the ``tuning.UpdateCoefficients``
of the step:

    gbar <- avg_decay gbar + avg_weight g
    v    <- momentum v + grad_scale g
    x    <- (1 - lr decay_rate decay) x - lr step_size d,    d = v, or grad_scale g + momentum v (Nesterov)

with ``lr`` the group's multiplier and ``decay`` the decoupled weight decay (0 when it is coupled), whose unit the
tuner sets (``tuning.decay_rate``).
Every flavour of a pass has the same signature:

- ``*_single_tensor``: one tensor at a time, every sum in float64. The obviously correct reference
  (``foreach=False``), and the only flavour for sparse gradients.
- ``*_multi_tensor``: ``torch._foreach_*`` kernels over the dense tensors of each device and dtype
  (the default for dense gradients).
- ``*_compiled``: ``torch.compile``d kernels over the dense tensors of each device and dtype
  (``fused=True``).

Each flavour is one complete function, so the three parallel each other deliberately (as
torch/optim/adam.py's do). Tests hold all three to the same numbers (tests/test_passes.py).
Nothing here reads a tensor value on the host; a skipped step (``finite`` False) reads its
gradient as zeros, so 0 * NaN cannot leak.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .measurements import SECOND_MOMENT_BETA, Sums, adam_metric, next_second_moment
from .tuning import FormScalars, UpdateCoefficients, primal_average_coefficients


# --------------------------------------------------------------------------------- pass 1: reduce
class Trajectory(NamedTuple):
    """What the scale-free tuner's sums read besides g and gbar (``Sums.grad_dot_step`` and after), one entry
    per gradient: where each parameter is, where it started, and the momentum buffer it moves along. ``momenta``
    is None where no secant is measured (every step rule but ``"secant"``): its two sums, <g, v> and ||v||^2,
    then stay zero, and pass 1 reads neither v nor computes them."""

    params: list[Tensor]
    initial_params: list[Tensor]
    momenta: list[Tensor] | None
    # The primal-average form (``update_primal_average_*``): the parameters hold y, and the distance is measured on
    # z = y + b w, with w the momentum buffer (``leads``) and b the last applied momentum (``lead_weight``, 0-dim).
    leads: list[Tensor] | None = None
    lead_weight: Tensor | None = None

    def pick(self, indices) -> "Trajectory":
        lists = (None if tensors is None else [tensors[i] for i in indices] for tensors in self[:4])
        return Trajectory(*lists, self.lead_weight)


def reduce_single_tensor(
    grads: list[Tensor], grad_avgs: list[Tensor], *, count_nonzero: bool, trajectory: Trajectory | None = None
) -> Tensor:
    """The ``Sums`` vector of the tensors, one tensor at a time, all in float64 (dense or sparse)."""
    rows = []
    for index, (grad, grad_avg) in enumerate(zip(grads, grad_avgs)):
        momentum_buffer = trajectory.momenta[index] if trajectory is not None and trajectory.momenta else None
        if grad.is_sparse:
            grad = grad.coalesce()
            values, avg_values = grad._values(), grad_avg.sparse_mask(grad)._values()
            if momentum_buffer is not None:
                momentum_values = momentum_buffer.sparse_mask(grad)._values()
        else:
            values, avg_values, momentum_values = grad, grad_avg, momentum_buffer
        values, avg_values = values.to(torch.float64), avg_values.to(torch.float64)
        row = Sums.zeros(values)._replace(
            sq_norm=torch.sum(values * values),
            cross=torch.sum(values * avg_values),
            grad_avg_sq_norm=torch.sum(grad_avg.to(torch.float64) ** 2),
            nonzero=torch.count_nonzero(values).to(torch.float64) if count_nonzero else values.new_zeros(()),
            numel=values.new_full((), float(grad_avg.numel())),
        )
        if trajectory is not None:
            x, x0 = trajectory.params[index].to(torch.float64), trajectory.initial_params[index].to(torch.float64)
            displacement = x - x0
            if trajectory.leads is not None:  # (z - x_0 = y - x_0 + b w)
                displacement += trajectory.leads[index].to(torch.float64) * trajectory.lead_weight
            # (a sparse gradient pairs with the displacement's entries at its indices)
            paired = displacement.sparse_mask(grad)._values() if grad.is_sparse else displacement
            row = row._replace(grad_sq_norm_lr=row.sq_norm, displacement_sq=torch.sum(displacement**2),
                               grad_dot_displacement=torch.sum(values * paired))
            if momentum_buffer is not None:
                v = momentum_buffer.to(torch.float64)
                row = row._replace(grad_dot_step=torch.sum(values * momentum_values.to(torch.float64)),
                                   step_sq_norm=torch.sum(v * v))
        rows.append(row.vector())
    return add_sums(rows)


def reduce_multi_tensor(
    grads: list[Tensor], grad_avgs: list[Tensor], *, count_nonzero: bool, trajectory: Trajectory | None = None
) -> Tensor:
    """The ``Sums`` vector of dense tensors, with multi-tensor kernels per device and dtype.

    The norms accumulate in float64, as on the other flavours: in float32 a gradient of norm above
    ~1.8e19 would overflow and be skipped (and one below ~1e-23 would read as zero) where the others
    apply it. (On CUDA the kernel reads float32 and accumulates in float64; on CPU torch converts each
    tensor, which costs about a quarter of a step.) The dots' products stay in the tensors' dtype (float64
    products cost the scale-free reduction 15% on CPU and change every run's rounding): where one overflows,
    at gradient norms near float32's limit, ``measurements.within_cauchy_schwarz`` brings the dot back inside
    its bound, finite but no longer exact, so that there this flavour departs from the per-tensor one.
    """
    rows = []
    extra = () if trajectory is None else (trajectory.params, trajectory.initial_params)
    if trajectory is not None and trajectory.leads is not None:
        extra += (trajectory.leads,)
    elif trajectory is not None and trajectory.momenta is not None:
        extra += (trajectory.momenta,)
    for grads, grad_avgs, *extra in _by_device_and_dtype(grads, grad_avgs, *extra):
        count = float(sum(g.numel() for g in grads))
        if grads[0].dtype in (torch.float16, torch.bfloat16):
            grads, grad_avgs = [g.float() for g in grads], [a.float() for a in grad_avgs]
        cross = _dot_in_dtype(grads, grad_avgs)
        row = Sums.zeros(cross)._replace(
            sq_norm=_sq_norm(grads),
            cross=cross,
            grad_avg_sq_norm=_sq_norm(grad_avgs),
            nonzero=(torch.stack([torch.count_nonzero(g) for g in grads]).sum().to(torch.float64)
                     if count_nonzero else torch.zeros_like(cross)),
            # (new_full fills on the device; a tensor built from a host number would be a copy)
            numel=cross.new_full((), count),
        )
        if trajectory is not None:
            params, initial_params, *momenta = extra
            displacements = torch._foreach_sub(params, initial_params)
            if trajectory.leads is not None:  # (z - x_0 = y - x_0 + b w, in the one temporary)
                leads, momenta = momenta[0], []
                weight = trajectory.lead_weight.to(params[0].device)
                torch._foreach_addcmul_(displacements, leads, [weight] * len(leads))
            row = row._replace(
                grad_sq_norm_lr=row.sq_norm, displacement_sq=_sq_norm(displacements),
                grad_dot_displacement=_dot_in_dtype(grads, displacements),
            )
            if momenta:
                # The secant is a difference of two such dots: products in the tensors' dtype, sums in float64.
                row = row._replace(grad_dot_step=_dot(grads, momenta[0]), step_sq_norm=_sq_norm(momenta[0]))
        rows.append(row.vector())
    return add_sums(rows)


def _sq_norm(tensors: list[Tensor]) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square().sum()


def _dot(tensors: list[Tensor], others: list[Tensor]) -> Tensor:
    """sum_i <a_i, b_i>: products in the tensors' dtype, sums in float64, for the dots whose value the tuner
    uses (the secant's, the preconditioned signal's)."""
    return torch.stack([torch.sum(a * b, dtype=torch.float64) for a, b in zip(tensors, others)]).sum()


def _dot_in_dtype(tensors: list[Tensor], others: list[Tensor]) -> Tensor:
    """sum_i <a_i, b_i>, each <a_i, b_i> accumulated in the tensors' dtype and their sum in float64: on CPU a
    quarter to a third of ``_dot``'s cost (docs/performance.md), for the dots that need less: gbar's cross term (the
    reference's rounding) and the distance hold's pairing, of which only the sign of a running mean is read."""
    dots = []
    for a, b in zip(tensors, others):
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)  # (no half accumulators)
        dots.append(torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)))
    return torch.stack(dots).to(torch.float64).sum()


def reduce_compiled(
    grads: list[Tensor], grad_avgs: list[Tensor], *, count_nonzero: bool, trajectory: Trajectory | None = None
) -> Tensor:
    """The ``Sums`` vector of dense tensors, with compiled kernels per device and dtype, accumulated in
    float64 inside the kernel (so it costs what a float32 read costs and keeps the reference's range)."""
    rows = []
    extra = () if trajectory is None else (trajectory.params, trajectory.initial_params)
    if trajectory is not None and (trajectory.leads is not None or trajectory.momenta is not None):
        extra += (trajectory.leads if trajectory.leads is not None else trajectory.momenta,)
    for grads, grad_avgs, *extra in _by_device_and_dtype(grads, grad_avgs, *extra):
        count = float(sum(g.numel() for g in grads))
        grads, grad_avgs = _at_least_1d(grads), _at_least_1d(grad_avgs)
        extra = [_at_least_1d(tensors) for tensors in extra]
        total = None
        for part in _chunks(len(grads)):
            part_trajectory = None
            if extra:  # (as in reduce_multi_tensor: the momenta only where the secant is measured)
                params, initial_params, *momenta = (tensors[part] for tensors in extra)
                momenta = momenta[0] if momenta else None
                if trajectory.leads is not None:  # (the primal-average form's w, and its weight b)
                    weight = trajectory.lead_weight.to(params[0].device)
                    part_trajectory = Trajectory(params, initial_params, None, momenta, weight)
                else:
                    part_trajectory = Trajectory(params, initial_params, momenta)
            row = _compiled_sums(grads[part], grad_avgs[part], count_nonzero, part_trajectory)
            total = row if total is None else total + row
        # The kernel leaves numel at zero (a count of a dynamic shape would be a graph input of its own).
        rows.append(Sums.from_vector(total)._replace(numel=total.new_full((), count)).vector())
    return add_sums(rows)


def _sums_kernel(
    grads: list[Tensor], grad_avgs: list[Tensor], count_nonzero: bool, trajectory: Trajectory | None
) -> Tensor:
    total = None
    for index, (grad, grad_avg) in enumerate(zip(grads, grad_avgs)):
        g, a = grad.to(torch.float64), grad_avg.to(torch.float64)
        row = Sums.zeros(g)._replace(
            sq_norm=(g * g).sum(),
            cross=(g * a).sum(),
            grad_avg_sq_norm=(a * a).sum(),
            nonzero=(grad != 0).sum().to(torch.float64) if count_nonzero else g.new_zeros(()),
        )
        if trajectory is not None:
            x, x0 = trajectory.params[index].to(torch.float64), trajectory.initial_params[index].to(torch.float64)
            displacement = x - x0
            if trajectory.leads is not None:  # (z - x_0 = y - x_0 + b w)
                displacement = displacement + trajectory.leads[index].to(torch.float64) * trajectory.lead_weight
            row = row._replace(grad_sq_norm_lr=row.sq_norm, displacement_sq=(displacement**2).sum(),
                               grad_dot_displacement=(g * displacement).sum())
            if trajectory.momenta is not None:
                v = trajectory.momenta[index].to(torch.float64)
                row = row._replace(grad_dot_step=(g * v).sum(), step_sq_norm=(v * v).sum())
        row = row.vector()
        total = row if total is None else total + row
    return total


# --------------------------------------------------------------------------------- pass 2: update
def update_single_tensor(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], momenta: list[Tensor],
    c: UpdateCoefficients, *, lr: float | Tensor, decay: float, nesterov: bool,
) -> None:
    """Pass 2 one tensor at a time (dense or sparse gradients): the reference."""
    step_size = c.step_size * lr
    bounded = _per_dtype(params, c.grad_scale, step_size, 1.0 - c.decay_rate * lr * decay)
    for param, grad, grad_avg, momentum_buffer in zip(params, grads, grad_avgs, momenta):
        grad_scale, step, shrink = bounded[param.dtype]
        grad = _finite_grad(grad, c.finite)
        grad_avg.mul_(c.avg_decay).add_(grad * c.avg_weight)
        scaled = grad * grad_scale
        momentum_buffer.mul_(c.momentum).add_(scaled)
        direction = scaled + momentum_buffer * c.momentum if nesterov else momentum_buffer
        if decay != 0.0:
            param.mul_(shrink)
        param.add_(direction * -step)


def update_multi_tensor(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], momenta: list[Tensor],
    c: UpdateCoefficients, *, lr: float | Tensor, decay: float, nesterov: bool,
) -> None:
    """Pass 2 over dense tensors with multi-tensor kernels, per device and dtype."""
    step_size = c.step_size * lr
    for params, grads, grad_avgs, momenta in _by_device_and_dtype(params, grads, grad_avgs, momenta):
        device = params[0].device
        finite, avg_decay, avg_weight, momentum = (
            x.to(device) for x in (c.finite, c.avg_decay, c.avg_weight, c.momentum))
        grad_scale, lr_alpha, shrink = _scalars_for(params[0], c.grad_scale, step_size, 1.0 - c.decay_rate * lr * decay)
        grads = [_finite_grad(g, finite) for g in grads]
        # x += c * y as addcmul with a 0-dim c: one pass, where mul-then-add makes a temporary.
        torch._foreach_mul_(grad_avgs, avg_decay)
        torch._foreach_addcmul_(grad_avgs, grads, [avg_weight] * len(grads))
        torch._foreach_mul_(momenta, momentum)
        torch._foreach_addcmul_(momenta, grads, [grad_scale] * len(grads))
        direction = momenta
        if nesterov:
            direction = torch._foreach_addcmul(torch._foreach_mul(momenta, momentum), grads,
                                               [grad_scale] * len(grads))
        if decay != 0.0:
            torch._foreach_mul_(params, shrink)
        torch._foreach_addcmul_(params, direction, [-lr_alpha] * len(params))


def update_compiled(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], momenta: list[Tensor],
    c: UpdateCoefficients, *, lr: float | Tensor, decay: float, nesterov: bool,
) -> None:
    """Pass 2 over dense tensors with compiled kernels, per device and dtype. Every coefficient is a
    0-dim tensor, so the tuned values (and a scheduled ``lr``) change without recompiling."""
    step_size = c.step_size * lr
    for params, grads, grad_avgs, momenta in _by_device_and_dtype(params, grads, grad_avgs, momenta):
        device = params[0].device
        coefficients = tuple(x.to(device) for x in (c.finite, c.avg_decay, c.avg_weight, c.momentum)) + _scalars_for(
            params[0], c.grad_scale, step_size, 1.0 - c.decay_rate * lr * decay)
        params, grads, grad_avgs, momenta = map(_at_least_1d, (params, grads, grad_avgs, momenta))
        for part in _chunks(len(params)):
            _compiled_update(params[part], grads[part], grad_avgs[part], momenta[part], *coefficients, nesterov)


def _update_kernel(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], momenta: list[Tensor],
    finite: Tensor, avg_decay: Tensor, avg_weight: Tensor, momentum: Tensor, grad_scale: Tensor,
    step_size: Tensor, shrink: Tensor, nesterov: bool,
) -> None:
    # (a skipped step is a where inside the kernel instead of a copy of the gradient)
    for param, grad, grad_avg, momentum_buffer in zip(params, grads, grad_avgs, momenta):
        g = torch.where(finite, grad, 0.0)
        grad_avg.copy_(grad_avg * avg_decay + g * avg_weight)
        scaled = g * grad_scale
        v = momentum_buffer * momentum + scaled
        momentum_buffer.copy_(v)
        direction = scaled + v * momentum if nesterov else v
        param.copy_(param * shrink - step_size * direction)


# --------------------------------------------------------------------------------- pass 2 in primal-average form
# With ``momentum_form="primal_average"`` (docs/algorithm.md §11) the parameters hold y = (1 - b) z + b xbar and the
# momentum buffer holds the lead w = z - xbar of the plain-SGD sequence z over its average xbar (b the momentum
# applied at the step before, ``previous_momentum``; m this step's). With eta = lr step_size / (1 - m) z's step, c
# the average's weight (``average_weight``) and u = w - eta s g:
#
#     z <- z - eta s g,  xbar <- xbar + c (z - xbar),  y <- (1 - m) z + m xbar
#     so  w <- (1 - c) u   and   y <- y - (1 - b) w + (c + (1 - m)(1 - c)) u
#
# written without u: y <- y + (k - (1 - b)) w - k eta s g with k = c + (1 - m)(1 - c), then w <- (1 - c)(w - eta s g).
# Nothing is divided by 1 - b, so z and xbar are never formed (pass 1 forms z - x_0 for the distance, through
# ``Trajectory.leads``). A skipped step (m = b = 1, c = 0, eta = 0) changes nothing. gbar is updated as in heavy
# ball's pass. Dense gradients only; the three flavours.
#
# Decoupled weight decay lambda (``decay``) joins z's step at the point the gradient was taken, as Schedule-Free AdamW
# decays: z <- z - eta (s g + lambda rho y), so e = eta lambda rho y (``decay_step`` times y before the update) enters
# as the gradient's term does: y <- y - k e, w <- w - e (before w's decay). The shrink per step, lr lambda
# decay_rate, is heavy ball's (rho: the plain metric's gradient RMS per coordinate, 1 in Adam's; tuning.decay_rate).
def update_primal_average_single_tensor(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], leads: list[Tensor],
    c: UpdateCoefficients, *, lr: float | Tensor, decay: float = 0.0,
) -> None:
    """Pass 2 in primal-average form, one tensor at a time: the reference."""
    bounded = _per_dtype(params, *primal_average_coefficients(c, lr, decay))
    for param, grad, grad_avg, lead in zip(params, grads, grad_avgs, leads):
        grad = _finite_grad(grad, c.finite)
        grad_avg.mul_(c.avg_decay).add_(grad * c.avg_weight)
        _form_step_single_tensor(param, lead, grad, FormScalars(*bounded[param.dtype]), decay)


def update_primal_average_multi_tensor(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], leads: list[Tensor],
    c: UpdateCoefficients, *, lr: float | Tensor, decay: float = 0.0,
) -> None:
    """Pass 2 in primal-average form with multi-tensor kernels, per device and dtype."""
    scalars = primal_average_coefficients(c, lr, decay)
    for params, grads, grad_avgs, leads in _by_device_and_dtype(params, grads, grad_avgs, leads):
        device = params[0].device
        finite, avg_decay, avg_weight = (x.to(device) for x in (c.finite, c.avg_decay, c.avg_weight))
        grads = [_finite_grad(g, finite) for g in grads]
        torch._foreach_mul_(grad_avgs, avg_decay)
        torch._foreach_addcmul_(grad_avgs, grads, [avg_weight] * len(grads))
        _form_step_multi_tensor(params, leads, grads, FormScalars(*_scalars_for(params[0], *scalars)), decay)


def _form_step_single_tensor(param: Tensor, lead: Tensor, direction: Tensor, scalars: FormScalars,
                             decay: float) -> None:
    """y and w of one tensor moved by z's step along ``direction`` (g, or M^-1 g in Adam's metric), and along y for
    decoupled decay."""
    decayed = param * scalars.decay_step if decay != 0.0 else None  # (at y before the update)
    param.add_(lead * scalars.lead_into_params).add_(direction * -scalars.param_step)
    lead.sub_(direction * scalars.fast_step)
    if decayed is not None:
        param.sub_(decayed * scalars.into_params)
        lead.sub_(decayed)
    lead.mul_(scalars.kept)


def _form_step_multi_tensor(params: list[Tensor], leads: list[Tensor], directions: list[Tensor],
                            scalars: FormScalars, decay: float) -> None:
    """``_form_step_single_tensor`` with multi-tensor kernels (the scalars on the tensors' device)."""
    count = len(params)
    decayed = torch._foreach_mul(params, scalars.decay_step) if decay != 0.0 else None
    torch._foreach_addcmul_(params, leads, [scalars.lead_into_params] * count)
    torch._foreach_addcmul_(params, directions, [-scalars.param_step] * count)
    torch._foreach_addcmul_(leads, directions, [-scalars.fast_step] * count)
    if decayed is not None:
        torch._foreach_addcmul_(params, decayed, [-scalars.into_params] * count)
        torch._foreach_sub_(leads, decayed)
    torch._foreach_mul_(leads, scalars.kept)


def update_primal_average_compiled(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], leads: list[Tensor],
    c: UpdateCoefficients, *, lr: float | Tensor, decay: float = 0.0,
) -> None:
    """Pass 2 in primal-average form with compiled kernels, per device and dtype (0-dim coefficients: the tuned
    values change without recompiling)."""
    scalars = primal_average_coefficients(c, lr, decay)
    for params, grads, grad_avgs, leads in _by_device_and_dtype(params, grads, grad_avgs, leads):
        device = params[0].device
        coefficients = tuple(x.to(device) for x in (c.finite, c.avg_decay, c.avg_weight)) + _scalars_for(
            params[0], *scalars)
        params, grads, grad_avgs, leads = map(_at_least_1d, (params, grads, grad_avgs, leads))
        for part in _chunks(len(params)):
            _compiled_primal_average_update(params[part], grads[part], grad_avgs[part], leads[part], *coefficients)


def _primal_average_update_kernel(
    params: list[Tensor], grads: list[Tensor], grad_avgs: list[Tensor], leads: list[Tensor], finite: Tensor,
    avg_decay: Tensor, avg_weight: Tensor, fast_step: Tensor, param_step: Tensor, lead_into_params: Tensor,
    kept: Tensor, decay_step: Tensor, into_params: Tensor,
) -> None:
    for param, grad, grad_avg, lead in zip(params, grads, grad_avgs, leads):
        g = torch.where(finite, grad, 0.0)
        grad_avg.copy_(grad_avg * avg_decay + g * avg_weight)
        _kernel_form_step(param, lead, g, fast_step, param_step, lead_into_params, kept, decay_step, into_params)


def _kernel_form_step(param: Tensor, lead: Tensor, direction: Tensor, fast_step: Tensor, param_step: Tensor,
                      lead_into_params: Tensor, kept: Tensor, decay_step: Tensor, into_params: Tensor) -> None:
    """Inside a compiled kernel: ``_form_step_single_tensor`` (the decay's terms are zeros without decay)."""
    decayed = param * decay_step
    param.copy_(param + lead * lead_into_params - direction * param_step - decayed * into_params)  # (w before)
    lead.copy_((lead - direction * fast_step - decayed) * kept)


# --------------------------------------------------------------------------------- after pass 2: the average
# With ``average=True`` the iterate average xbar follows x after every update: xbar <- xbar + w (x - xbar), with w
# ``UpdateCoefficients.average_weight`` (0 on a skipped step). It reads x and xbar once and writes xbar; whatever
# the tuner, the same two flavours (the compiled one takes the multi-tensor kernel: a lerp is one kernel already).
def average_single_tensor(params: list[Tensor], averages: list[Tensor], weight: Tensor) -> None:
    """The average one tensor at a time: the reference."""
    for param, average in zip(params, averages):
        average.lerp_(param, weight.to(param.device))


def average_multi_tensor(params: list[Tensor], averages: list[Tensor], weight: Tensor) -> None:
    """The average with multi-tensor kernels, per device and dtype."""
    for params, averages in _by_device_and_dtype(params, averages):
        torch._foreach_lerp_(averages, params, weight.to(params[0].device))


# --------------------------------------------------------------------------------- the preconditioned tuner
# With ``precondition="adam"`` (docs/algorithm.md §9) the passes read and write other tensors: no gradient average;
# the running average P of g^2 and its count; the momentum buffer v in the metric's coordinates. With M the metric
# of this step (``measurements.adam_metric``, from P updated by this step's g):
#
#     P <- b2 P + (1 - b2) g^2,  t <- t + 1     (not on a skipped step)
#     v <- momentum v + grad_scale g / sqrt(M)
#     x <- (1 - lr eta decay) x - lr step_size v / sqrt(M),   eta = step_size / (1 - momentum), AdamW's lr
#
# Pass 1 computes the same M from the P it would write, and reduces the sums in the metric. ``floor`` is M's eps
# (``measurements.metric_floor``), one 0-dim tensor for the scope. The same three flavours as the passes above:
# single-tensor (float64 sums, the reference), multi-tensor and compiled (``fused=True``); the metric is one
# function for all three.
#
# In primal-average form (``Preconditioned.lead_weight`` given) the momentum buffer holds the lead w = z - xbar and
# pass 2 is the plain form's (``primal_average_coefficients``) with z's step along M^-1 g instead of g:
#
#     y <- y + (k - (1 - b)) w - k eta s M^-1 g,   w <- (1 - c)(w - eta s M^-1 g)
#
# pass 1 measures the distance on z = y + b w, and <g, w> for the signal (``measurements.measure_signal_along_lead``).
class Preconditioned(NamedTuple):
    """The preconditioned tuner's tensors besides the gradients, one entry per gradient."""

    params: list[Tensor]
    initial_params: list[Tensor]  # x_0
    momenta: list[Tensor]  # v, in the metric's coordinates; in primal-average form the lead w = z - xbar
    second_moments: list[Tensor]  # P
    steps: list[Tensor]  # how many gradients P holds (0-dim, float64)
    # In primal-average form: b, the momentum applied at the step before (0-dim; None in heavy ball). The parameters
    # hold y and the distance is measured on z = y + b w.
    lead_weight: Tensor | None = None

    @property
    def lists(self) -> tuple[list[Tensor], ...]:
        """The per-tensor lists, in field order."""
        return self[:5]


def reduce_preconditioned_single_tensor(grads: list[Tensor], tensors: Preconditioned, floor: Tensor) -> Tensor:
    """The ``Sums`` vector in the metric, one tensor at a time, all in float64."""
    rows = []
    lead_weight = tensors.lead_weight
    for grad, param, initial_param, momentum_buffer, second_moment, steps in zip(grads, *tensors.lists):
        g, x, x0, v = (t.to(torch.float64) for t in (grad, param, initial_param, momentum_buffer))
        metric = adam_metric(next_second_moment(second_moment.to(torch.float64), g), steps + 1.0, floor)
        displacement = x - x0 if lead_weight is None else x - x0 + v * lead_weight  # (the form: z - x_0)
        rows.append(Sums.zeros(g)._replace(
            sq_norm=torch.sum(g * g / metric),
            numel=g.new_full((), float(g.numel())),
            displacement_sq=torch.sum(metric * displacement**2),
            grad_dot_displacement=torch.sum(g * displacement),
            grad_dot_momentum=torch.sum(g / torch.sqrt(metric) * v) if lead_weight is None else torch.sum(g * v),
            metric_sum=torch.sum(metric),
        ).vector())
    return add_sums(rows)


def reduce_preconditioned_multi_tensor(grads: list[Tensor], tensors: Preconditioned, floor: Tensor) -> Tensor:
    """The ``Sums`` vector in the metric, with multi-tensor kernels per device and dtype (sums in float64)."""
    rows = []
    lead_weight = tensors.lead_weight
    for grads, params, initial_params, momenta, second_moments, steps in _by_device_and_dtype(grads, *tensors.lists):
        next_moments = torch._foreach_mul(second_moments, SECOND_MOMENT_BETA)
        torch._foreach_addcmul_(next_moments, grads, grads, value=1.0 - SECOND_MOMENT_BETA)
        metrics = [adam_metric(p, t + 1.0, floor) for p, t in zip(next_moments, steps)]
        roots = torch._foreach_sqrt(metrics)
        scaled_grads = torch._foreach_div(grads, roots)  # g / sqrt(M)
        moved = torch._foreach_sub(params, initial_params)
        if lead_weight is not None:  # (the form: z - x_0 = y - x_0 + b w, in the one temporary)
            torch._foreach_addcmul_(moved, momenta, [lead_weight.to(params[0].device)] * len(momenta))
        displacements = torch._foreach_mul(moved, roots)
        grad_dot_momentum = _dot(scaled_grads, momenta) if lead_weight is None else _dot(grads, momenta)
        row = Sums.zeros(grad_dot_momentum)._replace(
            sq_norm=_sq_norm(scaled_grads),
            numel=grad_dot_momentum.new_full((), float(sum(g.numel() for g in grads))),
            displacement_sq=_sq_norm(displacements),
            grad_dot_displacement=_dot_in_dtype(grads, moved),
            grad_dot_momentum=grad_dot_momentum,
            metric_sum=torch.stack(torch._foreach_norm(metrics, 1, dtype=torch.float64)).sum(),
        )
        rows.append(row.vector())
    return add_sums(rows)


def update_preconditioned_single_tensor(
    grads: list[Tensor], tensors: Preconditioned, floor: Tensor, c: UpdateCoefficients, *, lr: float | Tensor,
    decay: float,
) -> None:
    """Pass 2 of the preconditioned tuner, one tensor at a time: the reference."""
    step_size = c.step_size * lr
    shrink = 1.0 - c.decay_rate * lr * decay
    form = tensors.lead_weight is not None
    bounded = _per_dtype(tensors.params, *(primal_average_coefficients(c, lr, decay) if form
                                            else (c.grad_scale, step_size, shrink)))
    for grad, param, _, momentum_buffer, second_moment, steps in zip(grads, *tensors.lists):
        grad = _finite_grad(grad, c.finite)
        second_moment.copy_(torch.where(c.finite, next_second_moment(second_moment, grad), second_moment))
        steps.add_(c.finite.to(steps.dtype))
        root = torch.sqrt(adam_metric(second_moment, steps, floor))
        if form:
            _form_step_single_tensor(param, momentum_buffer, grad / root / root, FormScalars(*bounded[param.dtype]),
                                     decay)
            continue
        grad_scale, step, shrink_here = bounded[param.dtype]
        momentum_buffer.mul_(c.momentum).add_(grad / root * grad_scale)
        if decay != 0.0:
            param.mul_(shrink_here)
        param.add_(momentum_buffer / root * -step)


def update_preconditioned_multi_tensor(
    grads: list[Tensor], tensors: Preconditioned, floor: Tensor, c: UpdateCoefficients, *, lr: float | Tensor,
    decay: float,
) -> None:
    """Pass 2 of the preconditioned tuner with multi-tensor kernels, per device and dtype."""
    step_size = c.step_size * lr
    shrink = 1.0 - c.decay_rate * lr * decay
    form = tensors.lead_weight is not None
    form_scalars = primal_average_coefficients(c, lr, decay) if form else ()
    for grads, params, _, momenta, second_moments, steps in _by_device_and_dtype(grads, *tensors.lists):
        device = params[0].device
        finite, momentum = c.finite.to(device), c.momentum.to(device)
        grad_scale, lr_alpha, shrink_here = _scalars_for(params[0], c.grad_scale, step_size, shrink)
        grads = [_finite_grad(g, finite) for g in grads]
        # P <- b2 P + (1 - b2) g^2 on an applied step; unchanged on a skipped one (its g reads as zeros).
        kept = (1.0 - (1.0 - SECOND_MOMENT_BETA) * finite.to(torch.float64)).to(second_moments[0].dtype)
        torch._foreach_mul_(second_moments, kept)
        torch._foreach_addcmul_(second_moments, grads, grads, value=1.0 - SECOND_MOMENT_BETA)
        torch._foreach_add_(steps, finite.to(steps[0].dtype))
        roots = torch._foreach_sqrt([adam_metric(p, t, floor) for p, t in zip(second_moments, steps)])
        if form:
            directions = torch._foreach_div(torch._foreach_div(grads, roots), roots)  # M^-1 g
            _form_step_multi_tensor(params, momenta, directions, FormScalars(*_scalars_for(params[0], *form_scalars)),
                                    decay)
            continue
        torch._foreach_mul_(momenta, momentum)
        torch._foreach_addcmul_(momenta, torch._foreach_div(grads, roots), [grad_scale] * len(grads))
        if decay != 0.0:
            torch._foreach_mul_(params, shrink_here)
        torch._foreach_addcmul_(params, torch._foreach_div(momenta, roots), [-lr_alpha] * len(params))


def reduce_preconditioned_compiled(grads: list[Tensor], tensors: Preconditioned, floor: Tensor) -> Tensor:
    """The ``Sums`` vector in the metric, with compiled kernels per device and dtype: the metric and the sums in
    float64 inside the kernel, as the reference computes them, in one read of the tensors (no float64 copies)."""
    rows = []
    for grads, params, initial_params, momenta, second_moments, steps in _by_device_and_dtype(grads, *tensors.lists):
        count = float(sum(g.numel() for g in grads))
        floor_here = floor.to(grads[0].device)
        lead_weight = None if tensors.lead_weight is None else tensors.lead_weight.to(grads[0].device)
        lists = [_at_least_1d(t) for t in (grads, params, initial_params, momenta, second_moments, steps)]
        total = None
        for part in _chunks(len(grads)):
            row = _compiled_preconditioned_sums(*(each[part] for each in lists), floor_here, lead_weight)
            total = row if total is None else total + row
        # (numel as in reduce_compiled: outside the kernel)
        rows.append(Sums.from_vector(total)._replace(numel=total.new_full((), count)).vector())
    return add_sums(rows)


def _preconditioned_sums_kernel(
    grads: list[Tensor], params: list[Tensor], initial_params: list[Tensor], momenta: list[Tensor],
    second_moments: list[Tensor], steps: list[Tensor], floor: Tensor, lead_weight: Tensor | None,
) -> Tensor:
    total = None
    for grad, param, initial_param, momentum_buffer, second_moment, count in zip(
        grads, params, initial_params, momenta, second_moments, steps
    ):
        g, x, x0, v, p = (t.to(torch.float64) for t in (grad, param, initial_param, momentum_buffer, second_moment))
        metric = adam_metric(next_second_moment(p, g), count.reshape(()) + 1.0, floor)
        displacement = x - x0 if lead_weight is None else x - x0 + v * lead_weight  # (the form: z - x_0)
        row = Sums.zeros(g)._replace(
            sq_norm=(g * g / metric).sum(),
            displacement_sq=(metric * displacement**2).sum(),
            grad_dot_displacement=(g * displacement).sum(),
            grad_dot_momentum=(g / torch.sqrt(metric) * v).sum() if lead_weight is None else (g * v).sum(),
            metric_sum=metric.sum(),
        ).vector()
        total = row if total is None else total + row
    return total


def update_preconditioned_compiled(
    grads: list[Tensor], tensors: Preconditioned, floor: Tensor, c: UpdateCoefficients, *, lr: float | Tensor,
    decay: float,
) -> None:
    """Pass 2 of the preconditioned tuner with compiled kernels, per device and dtype. Every coefficient is a 0-dim
    tensor, so the tuned values (and a scheduled ``lr``) change without recompiling."""
    step_size = c.step_size * lr
    shrink = 1.0 - c.decay_rate * lr * decay
    form = tensors.lead_weight is not None
    for grads, params, _, momenta, second_moments, steps in _by_device_and_dtype(grads, *tensors.lists):
        device = params[0].device
        scalars = primal_average_coefficients(c, lr, decay) if form else (c.momentum, c.grad_scale, step_size, shrink)
        coefficients = (floor.to(device), c.finite.to(device)) + _scalars_for(params[0], *scalars)
        # (the counts too: the kernel increments them in place)
        lists = [_at_least_1d(t) for t in (grads, params, momenta, second_moments, steps)]
        kernel = _compiled_preconditioned_primal_average_update if form else _compiled_preconditioned_update
        for part in _chunks(len(params)):
            kernel(*(each[part] for each in lists), *coefficients)


def _kernel_metric_root(grad: Tensor, second_moment: Tensor, count: Tensor, floor: Tensor, finite: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """Inside a compiled update kernel: (g, sqrt M) of one tensor, P and its count written (unchanged on a skipped
    step, whose g reads as zeros)."""
    g = torch.where(finite, grad, 0.0)
    p = torch.where(finite, next_second_moment(second_moment, g), second_moment)
    second_moment.copy_(p)
    count_after = count + finite.to(count.dtype)
    count.copy_(count_after)
    # (the count 0-dim again: one of 1 element would promote a float32 metric to float64, unlike the reference)
    return g, torch.sqrt(adam_metric(p, count_after.reshape(()), floor))


def _preconditioned_update_kernel(
    grads: list[Tensor], params: list[Tensor], momenta: list[Tensor], second_moments: list[Tensor],
    steps: list[Tensor], floor: Tensor, finite: Tensor, momentum: Tensor, grad_scale: Tensor, step_size: Tensor,
    shrink: Tensor,
) -> None:
    for grad, param, momentum_buffer, second_moment, count in zip(grads, params, momenta, second_moments, steps):
        g, root = _kernel_metric_root(grad, second_moment, count, floor, finite)
        v = momentum_buffer * momentum + g / root * grad_scale
        momentum_buffer.copy_(v)
        param.copy_(param * shrink + v / root * -step_size)


def _preconditioned_primal_average_update_kernel(
    grads: list[Tensor], params: list[Tensor], leads: list[Tensor], second_moments: list[Tensor],
    steps: list[Tensor], floor: Tensor, finite: Tensor, fast_step: Tensor, param_step: Tensor,
    lead_into_params: Tensor, kept: Tensor, decay_step: Tensor, into_params: Tensor,
) -> None:
    for grad, param, lead, second_moment, count in zip(grads, params, leads, second_moments, steps):
        g, root = _kernel_metric_root(grad, second_moment, count, floor, finite)
        _kernel_form_step(param, lead, g / root / root, fast_step, param_step, lead_into_params, kept, decay_step,
                          into_params)


# --------------------------------------------------------------------------------- helpers
_compiled_sums = torch.compile(_sums_kernel)
_compiled_update = torch.compile(_update_kernel)
_compiled_primal_average_update = torch.compile(_primal_average_update_kernel)
_compiled_preconditioned_sums = torch.compile(_preconditioned_sums_kernel)
_compiled_preconditioned_update = torch.compile(_preconditioned_update_kernel)
_compiled_preconditioned_primal_average_update = torch.compile(_preconditioned_primal_average_update_kernel)

# Tensors go to the compiled kernels in chunks of at most CHUNK so that compile time stays bounded
# for models with hundreds of parameters: after the first chunk, dynamo's automatic dynamic shapes
# let the other chunks reuse one kernel whatever their sizes.
CHUNK = 32


def _chunks(count: int) -> Iterator[slice]:
    return (slice(start, start + CHUNK) for start in range(0, count, CHUNK))


def _at_least_1d(tensors: list[Tensor]) -> list[Tensor]:
    # Inductor (torch 2.13, CPU) drops in-place writes to 0-dim tensor inputs; a 1-element view keeps them.
    return [t.view(1) if t.dim() == 0 else t for t in tensors]


def _by_device_and_dtype(*tensor_lists: list[Tensor]) -> Iterator[list[list[Tensor]]]:
    """The lists split by the device and dtype of the first list's tensors, as multi-tensor kernels need.

    torch's own grouping returns the buckets in no fixed order; they are visited in the order of their
    first tensor, so that the sums over buckets (and so the tuner's numbers) do not depend on it.
    """
    buckets = Optimizer._group_tensors_by_device_and_dtype(list(tensor_lists), with_indices=True)
    for lists, _ in sorted(buckets.values(), key=lambda bucket: bucket[1][0]):
        yield lists


def _in_range_of(dtype: torch.dtype, *scalars: Tensor) -> tuple[Tensor, ...]:
    """Pass 2's float64 scalars bounded to the range of the ``dtype`` of the tensors they multiply.

    The tuner bounds the step alpha g (alpha ||g|| is a distance), not alpha alone: DoG's first alpha = d / ||g|| is
    7e41 for a gradient whose norm is float32's smallest denormal. Cast to float32 it would be inf, and inf * 0 NaN.
    Bounded, a step beyond the dtype's range is shorter than the tuner's, and finite. Normal steps are untouched."""
    top = torch.finfo(dtype).max
    if top >= torch.finfo(torch.float64).max:
        return scalars
    return tuple(torch.clamp(x, -top, top) for x in scalars)


def _scalars_for(tensor: Tensor, *scalars: Tensor) -> tuple[Tensor, ...]:
    """The scalars on ``tensor``'s device, bounded to its dtype's range (``_in_range_of``): what a multi-tensor or
    compiled pass multiplies that device and dtype's tensors by."""
    return _in_range_of(tensor.dtype, *(x.to(tensor.device) for x in scalars))


def _per_dtype(params: list[Tensor], *scalars: Tensor) -> dict[torch.dtype, tuple[Tensor, ...]]:
    """``_in_range_of`` for each dtype of ``params``, for the single-tensor flavours (once per dtype, not per
    tensor)."""
    return {dtype: _in_range_of(dtype, *scalars) for dtype in {param.dtype for param in params}}


def add_sums(rows: list[Tensor]) -> Tensor:
    """The sum of ``Sums`` vectors, in list order, on the first one's device."""
    device = rows[0].device
    return torch.stack([row.to(device) for row in rows]).sum(dim=0)


def _finite_grad(grad: Tensor, finite: Tensor) -> Tensor:
    """The gradient, or zeros on a skipped step (so that 0 * grad cannot make NaN)."""
    if grad.is_sparse:
        grad = grad.coalesce()
        values = torch.where(finite, grad._values(), 0.0)
        return torch.sparse_coo_tensor(grad._indices(), values, grad.shape, is_coalesced=True, check_invariants=False)
    return torch.where(finite, grad, 0.0)
