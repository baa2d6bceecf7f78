"""YellowFin as a ``torch.optim.Optimizer``: walk the parameters, reduce, measure, tune, update.

One step of one tuning scope (spec §4) makes two passes over memory:

1. reduce g and the gradient average gbar to ||g||^2, <gbar, g>, ||gbar||^2 (and counts) in one
   float64 vector (all-reduced over ``shard_group`` when the parameters are sharded);
2. on 0-dim float64 tensors: clipping factors from the previous step's h_max, ||gbar||^2 after
   this step's update (``measurements.averaged_sq_norm``), ``measurements.measure``, ``tuning.tune``;
3. update gbar, the momentum buffers and the parameters.

Nothing in a step reads a tensor value on the host. A step whose gradient holds NaN or Inf
must change nothing, so, instead of branching, every coefficient is gated on the device:
the buffers are scaled by 1 and the (zeroed) gradient by 0, and the tuner state is selected
field by field. The per-parameter work exists twice, as a readable per-tensor loop (the
reference) and as multi-tensor ``torch._foreach_*`` calls; tests hold them to the same numbers.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from typing import Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import fused, measurements, tuning
from .state import TunerSettings, TunerState, check_bool, check_number

try:  # (torch builds without distributed support have no DTensor)
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None

# Per-group options (they may differ between groups that share one tuner).
_GROUP_OPTIONS = ("lr", "weight_decay", "decoupled_weight_decay", "nesterov", "maximize", "foreach", "fused")
# Keys torch itself may put into a param group.
_TORCH_GROUP_KEYS = ("params", "param_names", "differentiable")


class _Sums(NamedTuple):
    """What the first pass reduces, in float64: everything the tuner needs from the tensors."""

    sq_norm: Tensor  # ||g||^2
    cross: Tensor  # <gbar, g>, with gbar before this step's update
    grad_avg_sq_norm: Tensor  # ||gbar||^2, before this step's update
    nonzero: Tensor  # non-zero gradient entries (only counted with the sparsity correction)
    numel: Tensor  # gradient entries


class _Coefficients(NamedTuple):
    """Scalars of the update pass, already gated so that a skipped step changes nothing."""

    finite: Tensor  # False on a skipped step: the gradient is read as zeros
    avg_decay: Tensor  # gbar <- avg_decay gbar + avg_weight g  (1 and 0 on a skipped step)
    avg_weight: Tensor
    momentum: Tensor  # multiplies v (1 on a skipped step)
    grad_scale: Tensor  # multiplies g in v <- momentum v + grad_scale g (0 on a skipped step)
    step_size: Tensor  # alpha before the group's multiplier (0 on a skipped step)


class YellowFin(Optimizer):
    """Momentum SGD whose momentum and learning rate tune themselves (YellowFin).

    Args:
        params: parameters or parameter groups.
        lr: multiplier on the tuned learning rate (default 1). Stock ``lr_scheduler``s move it.
        beta: smoothing of every running average (0.999).
        curvature_window: number of recent curvature samples whose extremes give h_min, h_max.
        eps: guard against division by zero in the estimators and SingleStep.
        initial_lr, initial_momentum: alpha_0 and mu_0, used at the first step.
        adaptive_clipping: clip gradients against the measured curvature range (spec §4.2, §4.5).
        slow_start: ramp alpha over the first 10 windows.
        clip_norm: optional global gradient-norm clip, applied before everything else.
        weight_decay: L2 coefficient; coupled (it enters the gradient and so the statistics)
            unless ``decoupled_weight_decay``, which shrinks parameters by lr * alpha * weight_decay.
        nesterov: Nesterov's form of the momentum update.
        maximize: maximise the objective instead of minimising it.
        foreach: multi-tensor implementation (None picks it for dense gradients).
        fused: the two passes as ``torch.compile``d kernels (``yellowfin.fused``), and the tuner's
            scalar arithmetic compiled too; the first steps pay the compilation.
        per_group_tuning: one tuner per parameter group instead of one over all groups.
        sparsity_correction: rescale the estimates by the gradient density (sparse embeddings).
        update_first, curvature_smoothing, smooth_tuned: the paper's variant (see ``paper_variant``).
        shard_group: a ``torch.distributed`` process group over which the parameters are sharded
            (ZeRO, FSDP): the tuner's sums are all-reduced over it, one all-reduce per step that
            every rank enters, so every shard tunes on the whole gradient. Not saved in state_dict.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1.0,
        beta: float = 0.999,
        curvature_window: int = 20,
        eps: float = 1e-6,
        initial_lr: float = 1e-4,
        initial_momentum: float = 0.0,
        adaptive_clipping: bool = True,
        slow_start: bool = True,
        clip_norm: float | None = None,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        per_group_tuning: bool = False,
        sparsity_correction: bool = False,
        update_first: bool = False,
        curvature_smoothing: str = "log",
        smooth_tuned: bool = False,
        shard_group=None,
        **unknown,
    ):
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}; allowed options are "
                f"{sorted(TunerSettings.names() + _GROUP_OPTIONS + ('per_group_tuning', 'shard_group'))}"
            )
        settings = TunerSettings(
            beta=beta, curvature_window=curvature_window, eps=eps, initial_lr=initial_lr,
            initial_momentum=initial_momentum, adaptive_clipping=adaptive_clipping, slow_start=slow_start,
            clip_norm=clip_norm, sparsity_correction=sparsity_correction, update_first=update_first,
            curvature_smoothing=curvature_smoothing, smooth_tuned=smooth_tuned,
        )
        defaults = dict(
            vars(settings), lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, fused=fused,
        )
        check_bool("per_group_tuning", per_group_tuning)
        self.per_group_tuning = per_group_tuning
        self.shard_group = shard_group
        self._tuners: list[TunerState] = []
        super().__init__(params, defaults)
        self._tuners = [TunerState.initial(self._settings(groups[0]), _device_of(groups)) for groups in self._scopes()]

    @classmethod
    def paper_variant(cls, params: Iterable, **overrides) -> "YellowFin":
        """Algorithm 1 of the paper: update with the previous (mu, alpha), then measure and tune;
        linear curvature smoothing; mu and alpha smoothed; no slow start, no clipping; alpha_0 = 1."""
        options = dict(
            update_first=True, curvature_smoothing="linear", smooth_tuned=True,
            slow_start=False, adaptive_clipping=False, initial_lr=1.0,
        )
        options.update(overrides)
        return cls(params, **options)

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        unknown = set(param_group) - set(self.defaults) - set(_TORCH_GROUP_KEYS)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} in parameter group; allowed options are {sorted(self.defaults)}"
            )
        params = param_group["params"]
        param_group = {**param_group, "params": [params] if isinstance(params, Tensor) else list(params)}
        if any(is_dtensor(p) for p in param_group["params"]):
            raise ValueError("DTensor parameters (FSDP2 fully_shard): tuning on one shard's statistics would give "
                             "every rank different values; use yellowfin.distributed.FullyShardedYellowFin")
        if len({id(p) for p in param_group["params"]}) != len(param_group["params"]):
            # (torch only warns; the per-tensor and multi-tensor paths would update such a tensor once and twice)
            raise ValueError("a parameter group lists the same tensor more than once: list each parameter once")
        settings = _check_group({**self.defaults, **param_group})
        if not self.per_group_tuning and self.param_groups:
            shared = self._settings(self.param_groups[0])
            if settings != shared:
                raise ValueError(
                    "parameter groups that share one tuner must share its settings "
                    f"({', '.join(TunerSettings.names())}); pass per_group_tuning=True to tune groups separately"
                )
        super().add_param_group(param_group)
        if self.per_group_tuning and self._tuners:  # after construction: a new group brings its own tuner
            self._tuners.append(TunerState.initial(settings, _device_of([self.param_groups[-1]])))

    def _scopes(self) -> list[list[dict]]:
        """The groups each tuner measures: all of them, or one each."""
        if self.per_group_tuning:
            return [[group] for group in self.param_groups]
        return [self.param_groups]

    @staticmethod
    def _settings(group: dict) -> TunerSettings:
        return TunerSettings(**{name: group[name] for name in TunerSettings.names()})

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scopes = []  # (tuner index, settings, batches of the groups it measures)
        for index, groups in enumerate(self._scopes()):
            batches = [batch for batch in map(self._collect, groups) if batch.params]
            # A shard without gradients must still enter the all-reduce below.
            if batches or self.shard_group is not None:
                scopes.append((index, self._settings(groups[0]), batches))
        if not scopes:
            return loss

        # Pass 1: each tuner's g and gbar reduced to one float64 vector of ``_Sums``; with
        # shard_group, all tuners' vectors summed over the shards by a single all-reduce.
        device = self._tuners[scopes[0][0]].device
        totals = torch.zeros(len(scopes), len(_Sums._fields), dtype=torch.float64, device=device)
        for row, (_, settings, batches) in enumerate(scopes):
            for batch in batches:
                totals[row] += _reduce_sums(batch, settings.sparsity_correction).to(device)
        if self.shard_group is not None:
            torch.distributed.all_reduce(totals, group=self.shard_group)

        for row, (index, settings, batches) in enumerate(scopes):
            state = self._tuners[index]
            compiled = any(batch.mode == "fused" for batch in batches)
            tune = _compiled_tune_from_sums if compiled else _tune_from_sums
            self._tuners[index], coefficients = tune(state, totals[row].to(state.device), settings)
            # Pass 2: gbar, v and x written once.
            for batch in batches:
                _update(batch, coefficients)
        return loss

    def _collect(self, group: dict) -> "_Batch":
        """The group's parameters that have a gradient, their gradients (after maximize and
        coupled weight decay), and their two buffers, created on first use."""
        params, grads, grad_avgs, momenta = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = -p.grad if group["maximize"] else p.grad
            if group["weight_decay"] != 0.0 and not group["decoupled_weight_decay"]:
                if grad.is_sparse:
                    raise ValueError("coupled weight_decay does not support sparse gradients; "
                                     "use decoupled_weight_decay=True")
                grad = grad.add(p, alpha=group["weight_decay"])
            state = self.state[p]
            if not state:
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tensors = (p, grad, state["grad_avg"], state["momentum_buffer"])
            if p.is_complex():
                # A complex entry is two real coordinates: every path works on the real views, so
                # ||g||^2 = sum |g|^2 and <gbar, g> = Re sum conj(gbar) g, exactly as for the real twin.
                if grad.is_sparse:
                    raise ValueError("complex parameters with sparse gradients are not supported; "
                                     "allowed are dense gradients for complex parameters")
                tensors = tuple(map(torch.view_as_real, tensors))
            for values, tensor in zip((params, grads, grad_avgs, momenta), tensors):
                values.append(tensor)
        mode = "fused" if group["fused"] else "loop" if group["foreach"] is False else "foreach"
        return _Batch(group, params, grads, grad_avgs, momenta, mode)

    # ----------------------------------------------------------------------------- reading the tuner
    def stats(self) -> dict | list[dict]:
        """The tuner's current state as Python floats (one record per group with per_group_tuning).

        Reads tensors on the host: call it for logging, not inside a hot loop on a GPU.
        """
        records = [_record(state, self._settings(groups[0])) for state, groups in zip(self._tuners, self._scopes())]
        return records if self.per_group_tuning else records[0]

    def tuner_state(self, scope: int = 0) -> TunerState:
        """The tensors behind ``stats()`` for one tuner (read without host synchronisation)."""
        return self._tuners[scope]

    def set_momentum_offset(self, value: float | Tensor, scope: int | None = None) -> None:
        """Add ``value`` to the tuned momentum at every following update (the closed-loop hook).

        ``scope`` is the tuner index (a group index with per_group_tuning); None sets all.
        """
        indices = range(len(self._tuners)) if scope is None else [scope]
        for index in indices:
            state = self._tuners[index]
            offset = torch.as_tensor(value, dtype=torch.float64).detach().to(state.device).reshape(())
            self._tuners[index] = state.replace(momentum_offset=offset.clone())

    # ----------------------------------------------------------------------------- saving
    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["tuners"] = [state.as_dict() for state in self._tuners]
        state_dict["per_group_tuning"] = self.per_group_tuning
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint; everything is validated first, so a refused load changes nothing."""
        state_dict, tuners = self._checked_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._tuners = tuners

    def _checked_state_dict(self, state_dict: dict) -> tuple[dict, list[TunerState]]:
        """The state dict with missing group options filled in, and its tuners; raises ValueError
        (TypeError for a group option of the wrong type) for anything this optimizer would not accept."""
        state_dict = dict(state_dict)
        if "tuners" not in state_dict:
            raise ValueError("not a YellowFin state dict: it has no 'tuners' entry")
        tuners = state_dict.pop("tuners")
        per_group = state_dict.pop("per_group_tuning", self.per_group_tuning)
        if per_group != self.per_group_tuning:
            raise ValueError(f"state dict has per_group_tuning={per_group}, this optimizer {self.per_group_tuning}")
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        # A group saved before an option existed ran with that option's default, as torch's optimizers assume.
        saved_groups = [{**_option_defaults(), **saved} for saved in saved_groups]
        state_dict["param_groups"] = saved_groups
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {index} has {len(group['params'])} parameters, "
                    f"the state dict {len(saved['params'])}"
                )
            unknown = set(saved) - set(self.defaults) - set(_TORCH_GROUP_KEYS)
            if unknown:
                raise ValueError(f"parameter group {index} of the state dict has unknown option(s) {sorted(unknown)}")
            _check_group(saved)
        if not self.per_group_tuning and any(self._settings(g) != self._settings(saved_groups[0]) for g in saved_groups):
            raise ValueError("state dict has groups with different tuner settings but one shared tuner")
        params = {index: p for index, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for index, param_state in state_dict.get("state", {}).items():
            if index not in params:
                raise ValueError(f"state dict holds state for parameter {index}, which does not exist")
            for name, value in param_state.items():
                if isinstance(value, Tensor) and value.shape != params[index].shape:
                    raise ValueError(
                        f"state {name!r} of parameter {index} has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(params[index].shape)}"
                    )
                if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"state {name!r} of parameter {index} holds NaN or Inf: allowed are finite values")
        scopes = [[g] for g in saved_groups] if self.per_group_tuning else [saved_groups]
        if not isinstance(tuners, (list, tuple)) or len(tuners) != len(scopes):
            raise ValueError(f"state dict has {len(tuners)} tuners, this optimizer needs {len(scopes)}")
        restored = [
            TunerState.from_dict(values, self._settings(groups[0]), _device_of(own))
            for values, groups, own in zip(tuners, scopes, self._scopes())
        ]
        return state_dict, restored

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_tuners"] = self._tuners
        state["per_group_tuning"] = self.per_group_tuning
        state["shard_group"] = self.shard_group
        return state


# --------------------------------------------------------------------------------- the scalar step
def _tune_from_sums(state: TunerState, totals: Tensor, settings: TunerSettings) -> tuple[TunerState, "_Coefficients"]:
    """Everything between the two passes, on 0-dim float64 tensors: clipping, measure, tune.

    Returns the tuner's next state and the coefficients of the update pass, both already gated
    so that a non-finite gradient changes nothing but the skipped-step count.
    """
    sums = _Sums(*totals.unbind())
    finite = torch.isfinite(sums.sq_norm)  # (float64 sums: only a non-finite g makes this inf)
    # An all-zero gradient of the whole scope (a frozen phase, a masked loss) carries no information:
    # like a step without gradients it is a no-op, not a skip, so it cannot age or pollute the
    # estimates (step count, curvature window, averages, slow start). Zeros in some tensors while
    # others have a gradient are an ordinary step.
    applied = finite & (sums.sq_norm > 0.0)
    sq_norm = torch.where(finite, sums.sq_norm, 0.0)
    density = torch.ones_like(sq_norm)
    if settings.sparsity_correction:
        density = sums.nonzero / torch.clamp(sums.numel, min=1.0)

    # Clipping factors, from the previous step's curvature range.
    started = state.step >= 1.0
    norm = torch.sqrt(sq_norm)
    scale = torch.ones_like(norm)
    if settings.clip_norm is not None:
        scale = torch.where(norm > settings.clip_norm, settings.clip_norm / norm, 1.0)
    update_scale = torch.ones_like(norm)
    if settings.adaptive_clipping:
        stat_threshold = torch.sqrt(100.0 * state.h_max)
        clipped = started & (scale * norm > stat_threshold)
        scale = torch.where(clipped, stat_threshold / (scale * norm), scale)
        update_clipped = started & (scale**2 * sq_norm > state.h_max)
        update_scale = torch.where(update_clipped, torch.sqrt(state.h_max / (scale**2 * sq_norm)), 1.0)
    curvature_sample = scale**2 * sq_norm

    # The norm of the gradient average after this step's update, before the update pass writes it.
    avg_decay = torch.where(applied, torch.full_like(sq_norm, settings.beta), 1.0)
    avg_weight = torch.where(applied, (1.0 - settings.beta) * scale, 0.0)
    grad_avg_sq_norm = measurements.averaged_sq_norm(
        sums.grad_avg_sq_norm, torch.where(finite, sums.cross, 0.0), sq_norm, avg_decay, avg_weight
    )

    sample = measurements.GradientSample(curvature_sample, grad_avg_sq_norm, density)
    measured, estimates = measurements.measure(state, sample, settings)
    mu, lr = tuning.tune(estimates, state.step, state.mu, state.lr, settings)
    new_state = measured.replace(mu=mu, lr=lr, step=state.step + 1.0)

    # The update uses this step's (reference) or the previous step's (paper) tuned values.
    applied_mu, applied_lr = (state.mu, state.lr) if settings.update_first else (mu, lr)
    if settings.adaptive_clipping:
        # The first step has no curvature history to clip against, and alpha_0 is not tuned: a
        # gradient of norm 1e20 would move the parameters by alpha_0 * 1e20 and training would never
        # recover. Bound it by the tuner's own model of this one sample: the distance to the optimum
        # is D = ||g|| / ||g||^2, the step that SingleStep tunes for it (alpha = 1 / ||g||^2, mu = 0),
        # so alpha_0 ||g|| (scaled) may not exceed 1 / ||g||. Ordinary first steps are far below it.
        first_reach = applied_lr * curvature_sample  # alpha_0 ||g|| / (1 / ||g||)
        update_scale = torch.where(~started & (first_reach > 1.0), 1.0 / first_reach, update_scale)
    coefficients = _Coefficients(
        finite=applied,
        avg_decay=avg_decay,
        avg_weight=avg_weight,
        momentum=torch.where(applied, _applied_momentum(applied_mu, state.momentum_offset, settings.eps), 1.0),
        grad_scale=torch.where(applied, scale * update_scale, 0.0),
        step_size=torch.where(applied, applied_lr, 0.0),
    )
    new_state = new_state.select(applied, state).replace(
        skipped_steps=state.skipped_steps + (~finite).to(torch.float64)
    )
    return new_state, coefficients


# One graph of a few hundred scalar operations instead of as many eager kernel launches.
_compiled_tune_from_sums = torch.compile(_tune_from_sums)


# --------------------------------------------------------------------------------- helpers
class _Batch(NamedTuple):
    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    grad_avgs: list[Tensor]
    momenta: list[Tensor]
    mode: str  # "loop" (the per-tensor reference), "foreach" or "fused"


@functools.cache
def _option_defaults() -> dict:
    """Every option a parameter group holds, at its default (from YellowFin's signature: one place)."""
    parameters = inspect.signature(YellowFin.__init__).parameters
    return {name: parameters[name].default for name in TunerSettings.names() + _GROUP_OPTIONS}


def _check_group(group: dict) -> TunerSettings:
    """Validate a parameter group's options (at construction, add_param_group and load_state_dict alike);
    return its tuner settings. Raises TypeError for a value of the wrong type, ValueError out of range."""
    settings = YellowFin._settings(group)
    lr, weight_decay = group["lr"], group["weight_decay"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"invalid lr: a tensor lr must hold one real floating-point number, got {lr!r}")
        lr = float(lr)  # (validation only: reads the value on the host once, never inside step())
    check_number("lr", lr, "a number or a one-element tensor in [0, inf)")
    if not 0.0 <= lr < float("inf"):
        raise ValueError(f"invalid lr={group['lr']!r}: allowed range is [0, inf) (a multiplier on the tuned rate)")
    check_number("weight_decay", weight_decay, "a number in [0, inf)")
    if not 0.0 <= weight_decay < float("inf"):
        raise ValueError(f"invalid weight_decay={weight_decay!r}: allowed range is [0, inf)")
    for name in ("nesterov", "maximize", "decoupled_weight_decay"):
        check_bool(name, group[name])
    for name in ("foreach", "fused"):
        if group[name] is not None:
            check_bool(name, group[name])
    if group["foreach"] and group["fused"]:
        raise ValueError("foreach=True and fused=True are two implementations of the same step: choose one")
    return settings


def is_dtensor(tensor) -> bool:
    """A sharded ``DTensor`` (FSDP2); False where torch has no distributed support."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _device_of(groups: list[dict]) -> torch.device:
    for group in groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")


def _applied_momentum(mu: Tensor, offset: Tensor, eps: float) -> Tensor:
    """mu plus the external offset, kept inside (-1, 1) where heavy ball can converge."""
    return torch.clamp(mu + offset, -1.0 + eps, 1.0 - eps)


def _record(state: TunerState, settings: TunerSettings) -> dict:
    values = {name: float(getattr(state, name)) for name in (
        "mu", "lr", "h_min", "h_max", "grad_var", "dist", "momentum_offset"
    )}
    values["step"] = int(state.step)
    values["skipped_steps"] = int(state.skipped_steps)
    values["applied_momentum"] = float(_applied_momentum(state.mu, state.momentum_offset, settings.eps))
    return values


def _reduce_sums(batch: _Batch, count_nonzero: bool) -> Tensor:
    """The ``_Sums`` of one batch as a float64 vector (pass 1: reads g and gbar, writes nothing)."""
    rows = []
    dense = [i for i, g in enumerate(batch.grads) if not g.is_sparse]
    loop = [i for i, g in enumerate(batch.grads) if g.is_sparse]
    if batch.mode != "loop" and dense:
        kernel = fused.reduce_sums if batch.mode == "fused" else _reduce_sums_foreach
        for indices in _by_device_and_dtype([batch.grads[i] for i in dense], dense).values():
            grads = [batch.grads[i] for i in indices]
            row = kernel(grads, [batch.grad_avgs[i] for i in indices], count_nonzero)
            # (new_full fills on the device; a tensor built from a host number would be a copy)
            rows.append(torch.cat([row, row.new_full((1,), float(sum(g.numel() for g in grads)))]))
    else:
        loop = dense + loop
    for i in loop:  # the per-tensor reference, all in float64
        grad, grad_avg = batch.grads[i], batch.grad_avgs[i]
        if grad.is_sparse:
            grad = grad.coalesce()
            values, avg_values = grad._values(), grad_avg.sparse_mask(grad)._values()
        else:
            values, avg_values = grad, grad_avg
        values, avg_values = values.to(torch.float64), avg_values.to(torch.float64)
        rows.append(torch.stack([
            torch.sum(values * values),
            torch.sum(values * avg_values),
            torch.sum(grad_avg.to(torch.float64) ** 2),
            torch.count_nonzero(values).to(torch.float64) if count_nonzero else values.new_zeros(()),
            values.new_full((), float(grad_avg.numel())),
        ]))
    device = rows[0].device
    return torch.stack([row.to(device) for row in rows]).sum(dim=0)


def _reduce_sums_foreach(grads: list[Tensor], grad_avgs: list[Tensor], count_nonzero: bool) -> Tensor:
    """``_reduce_sums`` (without the element count) for dense tensors of one device and dtype,
    with multi-tensor kernels.

    The norms accumulate in float64, as on the reference and fused paths: in float32 a gradient
    of norm above ~1.8e19 would overflow and be skipped (and one below ~1e-23 would read as zero)
    where the other paths apply it. (On CUDA the kernel reads float32 and accumulates in float64;
    on CPU torch converts each tensor, which costs about a quarter of a step.) The cross term stays
    a float32 dot: where it overflows, ``measurements.averaged_sq_norm`` brings it back inside its
    Cauchy-Schwarz bound.
    """
    if grads[0].dtype in (torch.float16, torch.bfloat16):
        grads, grad_avgs = [g.float() for g in grads], [a.float() for a in grad_avgs]
    sq_norm = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum()
    avg_sq_norm = torch.stack(torch._foreach_norm(grad_avgs, 2, dtype=torch.float64)).square().sum()
    cross = torch.stack([torch.dot(g.reshape(-1), a.reshape(-1)) for g, a in zip(grads, grad_avgs)])
    cross = cross.to(torch.float64).sum()
    nonzero = torch.zeros_like(cross)
    if count_nonzero:
        nonzero = torch.stack([torch.count_nonzero(g) for g in grads]).sum().to(torch.float64)
    return torch.stack([sq_norm, cross, avg_sq_norm, nonzero])


def _update(batch: _Batch, c: _Coefficients) -> None:
    """Pass 2: gbar <- avg_decay gbar + avg_weight g;  v <- momentum v + grad_scale g;
    x <- x - lr * step_size * (v, or its Nesterov form)."""
    group = batch.group
    step_size = c.step_size * group["lr"]
    decay = group["weight_decay"] if group["decoupled_weight_decay"] else 0.0
    dense = [i for i, g in enumerate(batch.grads) if not g.is_sparse]
    loop = [i for i, g in enumerate(batch.grads) if g.is_sparse]
    if batch.mode == "fused" and dense:
        for indices in _by_device_and_dtype([batch.grads[i] for i in dense], dense).values():
            device = batch.params[indices[0]].device
            fused.update(
                [batch.params[i] for i in indices], [batch.grads[i] for i in indices],
                [batch.grad_avgs[i] for i in indices], [batch.momenta[i] for i in indices],
                *(x.to(device) for x in (c.finite, c.avg_decay, c.avg_weight, c.momentum, c.grad_scale, step_size,
                                         1.0 - step_size * decay)),
                nesterov=group["nesterov"],
            )
    elif batch.mode == "foreach" and dense:
        for indices in _by_device_and_dtype([batch.grads[i] for i in dense], dense).values():
            device = batch.params[indices[0]].device
            finite, avg_decay, avg_weight, momentum, grad_scale, lr = (
                x.to(device) for x in (c.finite, c.avg_decay, c.avg_weight, c.momentum, c.grad_scale, step_size)
            )
            params = [batch.params[i] for i in indices]
            momenta = [batch.momenta[i] for i in indices]
            grad_avgs = [batch.grad_avgs[i] for i in indices]
            # A skipped step must not let 0 * NaN through: read its gradient as zeros.
            grads = [_finite_grad(batch.grads[i], finite) for i in indices]
            # x += c * y as addcmul with a 0-dim c: one pass, where mul-then-add makes a temporary.
            torch._foreach_mul_(grad_avgs, avg_decay)
            torch._foreach_addcmul_(grad_avgs, grads, [avg_weight] * len(grads))
            torch._foreach_mul_(momenta, momentum)
            torch._foreach_addcmul_(momenta, grads, [grad_scale] * len(grads))
            direction = momenta
            if group["nesterov"]:
                direction = torch._foreach_addcmul(torch._foreach_mul(momenta, momentum), grads,
                                                   [grad_scale] * len(grads))
            if decay != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * decay)
            torch._foreach_addcmul_(params, direction, [-lr] * len(params))
    else:
        loop = dense + loop
    for i in loop:  # the per-tensor reference
        param, grad_avg, momentum_buffer = batch.params[i], batch.grad_avgs[i], batch.momenta[i]
        grad = _finite_grad(batch.grads[i], c.finite)
        grad_avg.mul_(c.avg_decay).add_(grad * c.avg_weight)
        scaled = grad * c.grad_scale
        momentum_buffer.mul_(c.momentum).add_(scaled)
        direction = scaled + momentum_buffer * c.momentum if group["nesterov"] else momentum_buffer
        if decay != 0.0:
            param.mul_(1.0 - step_size * decay)
        param.add_(direction * -step_size)


def _finite_grad(grad: Tensor, finite: Tensor) -> Tensor:
    """The gradient, or zeros on a skipped step (so that 0 * grad cannot make NaN)."""
    if grad.is_sparse:
        grad = grad.coalesce()
        values = torch.where(finite, grad._values(), 0.0)
        return torch.sparse_coo_tensor(grad._indices(), values, grad.shape, is_coalesced=True, check_invariants=False)
    return torch.where(finite, grad, 0.0)


def _by_device_and_dtype(tensors: list[Tensor], indices: list[int] | None = None) -> dict:
    """Indices of ``tensors`` bucketed by (device, dtype), as multi-tensor kernels need."""
    indices = list(range(len(tensors))) if indices is None else indices
    buckets: dict = defaultdict(list)
    for tensor, index in zip(tensors, indices):
        buckets[(tensor.device, tensor.dtype)].append(index)
    return buckets
