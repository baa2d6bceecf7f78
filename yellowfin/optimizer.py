"""YellowFin as a ``torch.optim.Optimizer``: the dispatcher (docs/algorithm.md §4).

It owns the parameter groups, their validation, ``state_dict`` and ``stats()``, and for each step
picks, per group, the flavour of the passes (``passes``: single-tensor, multi-tensor or compiled).
One step of one tuning scope:

1. ``passes.reduce_*``: g and the gradient average gbar reduced to one float64 ``measurements.Sums``
   vector per scope (all-reduced over ``shard_group`` when the parameters are sharded);
2. ``tuning.tune_step``: everything between the passes on 0-dim float64 tensors (gates, clipping,
   measuring, tuning), giving the tuner's next state and the ``tuning.UpdateCoefficients``;
3. ``passes.update_*``: gbar, the momentum buffers and the parameters written once.

Nothing in a step reads a tensor value on the host: a step whose gradient holds NaN or Inf must
change nothing, so instead of branching every coefficient is gated on the device (§4.7).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakTensorKeyDictionary

from . import measurements, passes, tuning
from .measurements import Sums
from .state import (DEFAULT_TUNER, INITIAL_DISTANCE_BEFORE_THE_OPTION, PRIMAL_AVERAGE_UNDER_STALENESS,
                    SECANT_UNDER_STALENESS, TunerSettings,
                    TunerState, check_bool, check_number)

try:  # (torch builds without distributed support have no DTensor)
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover
    _DTensor = None

# Per-group options (they may differ between groups that share one tuner).
_GROUP_OPTIONS = ("lr", "weight_decay", "decoupled_weight_decay", "nesterov", "maximize", "foreach", "fused")
# The authors' reference algorithm (docs/algorithm.md §5-§6), spelled out rather than read from the
# defaults, so that reference_variant keeps this meaning when the defaults change.
_REFERENCE_OPTIONS = dict(
    beta=0.999, curvature_window=20, eps=1e-6, initial_lr=1e-4, initial_momentum=0.0, adaptive_clipping=True,
    slow_start=True, update_first=False, curvature_smoothing="log", smooth_tuned=False, tuner="reference",
    step_rule=None, precondition=None, average=False,
)
# The options that YellowFin.choose_heavy_ball resolves again where a group left them to their defaults.
_FALLBACK_OPTIONS = ("momentum_form", "relative_clip", "clip_trigger", "average")
# Keys torch itself may put into a param group.
_TORCH_GROUP_KEYS = ("params", "param_names", "differentiable")


class YellowFin(Optimizer):
    r"""Momentum SGD whose momentum and learning rate tune themselves (YellowFin).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : x_0 \text{ (params)}, \: f(x) \text{ (objective)},
                \: \eta \text{ (lr, a multiplier)}, \: \beta, \: w \text{ (curvature window)},
                \: \varepsilon,                                                                  \\
            &\hspace{13mm} \alpha_0, \: \mu_0 \text{ (initial lr, momentum)}, \:
                c \text{ (clip norm)}, \: \lambda \text{ (weight decay)}, \:
                o \text{ (momentum offset)},                                                     \\
            &\hspace{13mm} \textit{nesterov}, \: \textit{maximize}, \: \textit{decoupled}      \\
            &\textbf{initialize} : v \leftarrow 0, \: \bar g \leftarrow 0 \text{ (per parameter)},
                \: L^{\max}, L^{\min}, S, N, \bar d \leftarrow 0                                 \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=0 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla_x f_t(x)                                          \\
            &\hspace{5mm}\textbf{if} \: \textit{maximize} : \: g_t \leftarrow -g_t               \\
            &\hspace{5mm}\textbf{if} \: \lambda \neq 0 \: \textbf{and not} \: \textit{decoupled}    \\
            &\hspace{10mm} g_t \leftarrow g_t + \lambda x                                        \\
            &\hspace{5mm}\textbf{if} \: \lVert g_t \rVert \text{ is not finite} :
                \: \textbf{skip} \text{ (nothing changes; } t \text{ stays)}                     \\
            &\hspace{5mm}\textbf{if} \: g_t = 0 : \: \textbf{continue}
                \text{ (a no-op, not counted as skipped)}                                        \\
            &\hspace{5mm}s \leftarrow \min(1, c / \lVert g_t \rVert)                              \\
            &\hspace{5mm}\textbf{if} \: t \geq 1 \text{ (adaptive clipping, with the previous } h_{\max}\text{)}  \\
            &\hspace{10mm} s \leftarrow s \min\big(1, \sqrt{100 h_{\max}} / (s \lVert g_t \rVert)\big), \:
                u \leftarrow \min\big(1, \sqrt{h_{\max}} / (s \lVert g_t \rVert)\big)            \\
            &\hspace{5mm}\textbf{else} \: u \leftarrow \min\big(1, 1 / (\alpha_0 s^2 \lVert g_t \rVert^2)\big)
                \text{ (the first step's bound)}                                                 \\
            &\hspace{5mm}\bar g \leftarrow \beta \bar g + (1-\beta) s g_t, \:
                h_t \leftarrow s^2 \lVert g_t \rVert^2, \: b \leftarrow 1 - \beta^{t+1}          \\
            &\hspace{5mm}L^{\max} \leftarrow \beta L^{\max} + (1-\beta)
                \log\big(\max_{t-w < k \leq t} h_k + \varepsilon\big), \:
                h_{\max} \leftarrow \exp(L^{\max} / b)                                           \\
            &\hspace{5mm}L^{\min} \leftarrow \beta L^{\min} + (1-\beta)
                \log\big(\min_{t-w < k \leq t} h_k + \varepsilon\big), \:
                h_{\min} \leftarrow \exp(L^{\min} / b)                                           \\
            &\hspace{5mm}S \leftarrow \beta S + (1-\beta) h_t, \:
                C \leftarrow \max\big(\varepsilon, S / b - \lVert \bar g / b \rVert^2\big)       \\
            &\hspace{5mm}N \leftarrow \beta N + (1-\beta) \sqrt{h_t}, \:
                \bar d \leftarrow \beta \bar d + (1-\beta) \frac{N / b}{S / b + \varepsilon}, \:
                D \leftarrow \bar d / b                                                          \\
            &\hspace{5mm}\textbf{if} \: t = 0 : \: \mu_t \leftarrow \mu_0, \: \alpha_t \leftarrow \alpha_0 \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm} p \leftarrow \frac{(D+\varepsilon)^2 (h_{\min}+\varepsilon)^2}{2 (C+\varepsilon)}, \:
                \kappa \leftarrow \max\Big(\frac{h_{\max}+\varepsilon}{h_{\min}+\varepsilon}, 1+\varepsilon\Big) \\
            &\hspace{10mm} \xi \leftarrow \text{the root in } (0, 1) \text{ of } (1-\xi)^3 = p \xi \\
            &\hspace{10mm} \sqrt{\mu_t} \leftarrow \max\Big(\xi, \frac{\sqrt{\kappa}-1}{\sqrt{\kappa}+1}\Big), \:
                \alpha_t \leftarrow \frac{(1-\sqrt{\mu_t})^2}{h_{\min}+\varepsilon}
                \min\Big(1, \frac{t+1}{10 w}\Big)                                                \\
            &\hspace{5mm}m \leftarrow \mathrm{clamp}(\mu_t + o, -1+\varepsilon, 1-\varepsilon)   \\
            &\hspace{5mm}v \leftarrow m v + s u g_t                                              \\
            &\hspace{5mm}\textbf{if} \: \textit{nesterov} : \: d \leftarrow s u g_t + m v \:
                \textbf{else} \: d \leftarrow v                                                  \\
            &\hspace{5mm}\textbf{if} \: \textit{decoupled} : \: x \leftarrow (1 - \eta \alpha_t \lambda) x \\
            &\hspace{5mm}x \leftarrow x - \eta \alpha_t d                                        \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \: x                                                             \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    The box shows the authors' algorithm (:meth:`reference_variant`, ``tuner="reference"``); the default
    tuner, ``tuner="scale_free"``, keeps its structure and replaces its estimates (below). All vectors are
    over every parameter of one tuning scope (all groups, or each group with ``per_group_tuning=True``);
    :math:`c = \infty` unless ``clip_norm`` is set. ``curvature_smoothing="linear"`` averages the extremes
    themselves instead of their logs, ``slow_start=False`` drops the factor :math:`\min(1, (t+1)/(10w))`,
    ``adaptive_clipping=False`` keeps :math:`s = \min(1, c / \lVert g_t \rVert)` and :math:`u = 1`,
    ``sparsity_correction=True`` rescales :math:`h_{\min}, h_{\max}, C, D` by the gradient density,
    ``smooth_tuned=True`` averages :math:`\mu_t` and :math:`\alpha_t` with :math:`\beta`, and
    ``update_first=True`` updates with :math:`(\mu_{t-1}, \alpha_{t-1})` instead of
    :math:`(\mu_t, \alpha_t)`; :meth:`paper_variant` sets the paper's choices. ``stats()`` reports
    :math:`t, \mu_t, \alpha_t, h_{\min}, h_{\max}, C, D, o, m`. The algorithm, each step explained:
    docs/algorithm.md §1-§6. The default, ``tuner="scale_free"``, replaces the tuning by one whose every estimate
    is in loss and parameter units, so that the trajectory does not depend on the loss scale (§8); it has no slow
    start, no :math:`\alpha_0`, :math:`\mu_0` or adaptive clipping, and clips the gradient it applies relative to
    its running RMS instead (``relative_clip``, ``clip_trigger``); its
    ``step_rule`` takes the step from DoWG's (``"dowg"``, the default), from DoWG's divided by sqrt(2), which noise
    alone neither grows nor shrinks (``"dowg_neutral"``, the default with ``precondition="adam"``), from DoG's, whose
    sum weighs every gradient alike (``"dog"``), or from a secant curvature (``"secant"``);
    with ``precondition="adam"`` it measures and steps in Adam's diagonal metric instead (§9). In either metric
    it applies the tuned pair in primal-averaging form (``momentum_form``, §11): the gradients are taken between a
    plain-SGD sequence and its average over the run, and in the plain metric the form keeps the polynomial average of
    those gradient points, which :meth:`averaged` puts in the parameters while you evaluate (``average=False``,
    and Adam's metric unless ``average=True``: the form's own average instead, one buffer less); where that form does
    not run (the secant rule, asynchrony, sparse gradients) it runs heavy ball, the box's update. Its decoupled
    weight decay has AdamW's meaning in either metric: a shrink of ``lr`` times λ times the update's size per
    coordinate, free of the loss scale (§8). ``average=True`` keeps the iterates' polynomial average in heavy ball
    too, for any tuner, and :meth:`averaged` hands it out likewise (§10): the trajectory is the same, the point you
    hand out is the average.

    Args:
        params: parameters or parameter groups.
        lr: :math:`\eta`, a multiplier on the tuned :math:`\alpha_t` (default 1); stock ``lr_scheduler``s
            move it. ``initial_lr`` is :math:`\alpha_0`.
        **options: every other option, keyword-only (``beta``, ``curvature_window``, ``eps``,
            ``initial_lr``, ``initial_momentum``, ``adaptive_clipping``, ``slow_start``, ``clip_norm``,
            ``weight_decay``, ``decoupled_weight_decay``, ``nesterov``, ``maximize``, ``foreach``,
            ``fused``, ``per_group_tuning``, ``sparsity_correction``, ``update_first``,
            ``curvature_smoothing``, ``smooth_tuned``, ``tuner``, ``step_rule``, ``precondition``,
            ``relative_clip``, ``clip_trigger``, ``initial_distance``, ``growth_cap``, ``hold_distance_uphill``,
            ``average``, ``momentum_form``, ``shard_group``): their defaults, ranges and meaning are listed once, in
            docs/algorithm.md §7.1.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1.0,
        *,
        beta: float | None = None,
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
        tuner: str = DEFAULT_TUNER,
        step_rule: str | None = None,
        precondition: str | None = None,
        relative_clip: float | None = None,
        clip_trigger: float | None = None,
        initial_distance: float | None = None,
        growth_cap: bool = False,
        hold_distance_uphill: bool | None = None,
        average: bool | None = None,
        momentum_form: str | None = None,
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
            curvature_smoothing=curvature_smoothing, smooth_tuned=smooth_tuned, tuner=tuner, step_rule=step_rule,
            precondition=precondition, relative_clip=relative_clip, clip_trigger=clip_trigger,
            initial_distance=initial_distance, growth_cap=growth_cap,
            hold_distance_uphill=hold_distance_uphill, average=average, momentum_form=momentum_form,
        )
        # (beta, step_rule, the clip, the first move, the distance hold, the momentum form and the average as given:
        # None stays None, so that each group's tuner picks its own)
        defaults = dict(
            vars(settings), beta=beta, step_rule=step_rule, relative_clip=relative_clip, clip_trigger=clip_trigger,
            initial_distance=initial_distance, hold_distance_uphill=hold_distance_uphill,
            momentum_form=momentum_form, average=average, lr=lr,
            weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, fused=fused,
        )
        check_bool("per_group_tuning", per_group_tuning)
        self.per_group_tuning = per_group_tuning
        self.shard_group = shard_group
        self._tuners: list[TunerState] = []
        self._averaged_out = False  # True inside averaged(): the parameters hold the averages
        # Per group, the options among _FALLBACK_OPTIONS that it left to their defaults (choose_heavy_ball may
        # change those); empty once a state dict is loaded, whose groups hold what they ran.
        self._left_to_default: list[frozenset[str]] = []
        # ||x_0|| of each x_0 buffer, measured once: only the scale-free tuner's start reads it, and measuring it at
        # every step cost a float64 norm per step (an eighth of the foreach step on CPU, docs/performance.md).
        # Keyed weakly by the buffer itself, so that a buffer replaced (load_state_dict) is measured again; not part
        # of the state dict or a pickle.
        self._initial_norms = WeakTensorKeyDictionary()
        super().__init__(params, defaults)
        self._tuners = [TunerState.initial(self._settings(groups[0]), _device_of(groups)) for groups in self._scopes()]

    @classmethod
    def reference_variant(cls, params: Iterable, **overrides) -> "YellowFin":
        """The authors' algorithm as their reference implementation runs it, for reproduction
        (docs/algorithm.md §5-§6): the library's defaults until the scale-free tuner replaced them,
        pinned here so that they keep this meaning."""
        options = dict(_REFERENCE_OPTIONS)
        options.update(overrides)
        return cls(params, **options)

    @classmethod
    def paper_variant(cls, params: Iterable, **overrides) -> "YellowFin":
        """Algorithm 1 of the paper: update with the previous (mu, alpha), then measure and tune;
        linear curvature smoothing; mu and alpha smoothed; no slow start, no clipping; alpha_0 = 1."""
        options = dict(
            _REFERENCE_OPTIONS, update_first=True, curvature_smoothing="linear", smooth_tuned=True,
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
        options = {**self.defaults, **param_group}
        settings = _check_group(options)
        # The group names its memory and momentum form (and a scale-free group its rule, clip, first move and
        # distance hold): a checkpoint keeps them when a default changes.
        param_group["beta"] = settings.beta
        param_group["momentum_form"] = settings.momentum_form
        param_group["average"] = settings.average
        if settings.scale_free:
            param_group.update(step_rule=settings.step_rule, relative_clip=settings.relative_clip,
                               clip_trigger=settings.clip_trigger, initial_distance=settings.initial_distance,
                               hold_distance_uphill=settings.hold_distance_uphill)
        if not self.per_group_tuning and self.param_groups:
            shared = self._settings(self.param_groups[0])
            if settings != shared:
                differ = ", ".join(f"{name} ({getattr(shared, name)!r} against {getattr(settings, name)!r})"
                                   for name in TunerSettings.names()
                                   if getattr(shared, name) != getattr(settings, name))
                raise ValueError(
                    f"parameter groups that share one tuner must share its settings; these differ: {differ}; pass "
                    "per_group_tuning=True to tune groups separately"
                )
        super().add_param_group(param_group)
        self._left_to_default.append(frozenset(name for name in _FALLBACK_OPTIONS if options.get(name) is None))
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
        self._refuse_inside_averaged("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._before_passes()
        # Dispatch only: the passes over the tensors are in ``passes``, everything between them in
        # ``tuning.tune_step``.
        scopes = []  # (tuner index, settings, batches of the groups it measures)
        for index, groups in enumerate(self._scopes()):
            # (a group whose parameters all stand still this step still moves their averages, by a weight of 0
            # unless the scope applies a step)
            batches = [batch for batch in map(self._collect, groups) if batch.params or batch.averages]
            # A shard without gradients must still enter the all-reduce below.
            if batches or self.shard_group is not None:
                scopes.append((index, self._settings(groups[0]), batches))
        if not scopes:
            return loss

        # Pass 1: each tuner's g and gbar reduced to one float64 vector of ``measurements.Sums``; with
        # shard_group, all tuners' vectors summed over the shards by a single all-reduce.
        device = self._tuners[scopes[0][0]].device
        totals = torch.zeros(len(scopes), len(Sums._fields), dtype=torch.float64, device=device)
        # (the preconditioned tuner's metric eps, from the last step's metric: the same in both passes)
        floors = [measurements.metric_floor(self._tuners[index]) if settings.preconditioned else None
                  for index, settings, _ in scopes]
        for row, (index, settings, batches) in enumerate(scopes):
            for batch in batches:
                if batch.params:
                    totals[row] += _reduce(batch, settings, floors[row], self._tuners[index].last_momentum).to(device)
        if self.shard_group is not None:
            torch.distributed.all_reduce(totals, group=self.shard_group)

        for row, (index, settings, batches) in enumerate(scopes):
            state = self._tuners[index]
            compiled = any(batch.flavour == "compiled" for batch in batches)
            tune_step = tuning.compiled_tune_step if compiled else tuning.tune_step
            sums = Sums.from_vector(totals[row].to(state.device))
            self._tuners[index], coefficients = tune_step(state, sums, settings)
            # Pass 2: gbar, v and x written once (then the average follows x, where it is kept).
            for batch in batches:
                if batch.params:
                    _update(batch, coefficients, floors[row])
                if batch.averages:
                    _AVERAGE_PASSES[batch.flavour](batch.averaged_params, batch.averages,
                                                   coefficients.average_weight)
        return loss

    def _before_passes(self) -> None:
        """Called by ``step`` once the gradients exist, before the passes read them (a hook for
        optimizers whose parameters are views of other tensors, such as FullyShardedYellowFin)."""

    def _collect(self, group: dict) -> "_Batch":
        """The group's parameters that have a gradient, their gradients (after maximize and
        coupled weight decay), and their buffers (``_BUFFERS``), created on first use."""
        params, grads, grad_avgs, momenta, initial_params, second_moments, steps = ([] for _ in range(7))
        initial_norms = []
        averaged_params, averages = [], []  # every parameter whose average is kept, with a gradient this step or not
        scale_free = group["tuner"] == "scale_free"
        preconditioned = group["precondition"] is not None
        for p in group["params"]:
            if p.grad is None:
                if "averaged_param" in self.state.get(p, {}):  # (it stood still: the average still follows it)
                    averaged_params.append(_real_view(p))
                    averages.append(_real_view(self.state[p]["averaged_param"]))
                continue
            grad = -p.grad if group["maximize"] else p.grad
            if group["weight_decay"] != 0.0 and not group["decoupled_weight_decay"]:
                if grad.is_sparse:
                    raise ValueError("coupled weight_decay does not support sparse gradients; "
                                     "use decoupled_weight_decay=True")
                grad = grad.add(p, alpha=group["weight_decay"])
            if group["momentum_form"] == "primal_average" and grad.is_sparse:
                self.choose_heavy_ball("momentum_form='primal_average' does not support sparse gradients: its update "
                                       "moves every entry; use momentum_form='heavy_ball'")
            if preconditioned and grad.is_sparse:
                raise ValueError(f"precondition={group['precondition']!r} does not support sparse gradients; "
                                 "use precondition=None")
            state = self.state[p]
            if not state:
                # The preconditioned tuner keeps no gradient average: its signal is read along the momentum.
                for name in sorted(_BUFFERS["preconditioned" if preconditioned else "plain"] - {"initial_param"}):
                    state[name] = (torch.zeros((), dtype=torch.float64, device=p.device) if name == "step"
                                   else torch.zeros_like(p, memory_format=torch.preserve_format))
            if scale_free and "initial_param" not in state:
                # x_0, where the distance travelled is measured from (only this tuner pays its memory).
                state["initial_param"] = p.detach().clone(memory_format=torch.preserve_format)
            if preconditioned:
                tensors = (p, grad, state["second_moment"], state["momentum_buffer"], state["initial_param"])
            else:
                tensors = (p, grad, state["grad_avg"], state["momentum_buffer"])
                if scale_free:
                    tensors += (state["initial_param"],)
            if p.is_complex():
                # A complex entry is two real coordinates: every path works on the real views, so
                # ||g||^2 = sum |g|^2 and <gbar, g> = Re sum conj(gbar) g, exactly as for the real twin.
                if grad.is_sparse:
                    raise ValueError("complex parameters with sparse gradients are not supported; "
                                     "allowed are dense gradients for complex parameters")
                tensors = tuple(map(torch.view_as_real, tensors))
            lists = (params, grads, second_moments if preconditioned else grad_avgs, momenta, initial_params)
            for values, tensor in zip(lists, tensors):
                values.append(tensor)
            if preconditioned:
                steps.append(state["step"])
            if scale_free:
                initial_norms.append(self._initial_norm(state["initial_param"]))
            if group["average"]:
                if "averaged_param" not in state:
                    # Its value so far: a parameter that first gets a gradient late has stood still until now.
                    state["averaged_param"] = p.detach().clone(memory_format=torch.preserve_format)
                averaged_params.append(tensors[0])  # (p, or its real view)
                averages.append(_real_view(state["averaged_param"]))
        return _Batch(group, params, grads, grad_avgs, momenta, _flavour(group), initial_params,
                      second_moments, steps, averaged_params, averages, initial_norms)

    def _initial_norm(self, initial_param: Tensor) -> Tensor:
        """||x_0|| of one parameter's x_0 buffer, in float64 (of its real view where it is complex)."""
        if "_initial_norms" not in self.__dict__:  # (an unpickled optimizer)
            self._initial_norms = WeakTensorKeyDictionary()
        norm = self._initial_norms.get(initial_param)
        if norm is None:
            # (the kernel that the multi-tensor pass used for these norms before they were kept)
            norm = torch._foreach_norm([_real_view(initial_param)], 2, dtype=torch.float64)[0]
            self._initial_norms[initial_param] = norm
        return norm

    # ----------------------------------------------------------------------------- the average
    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside ``with optimizer.averaged():`` the parameters hold the iterates' average (``average=True``, the
        default in the plain metric's primal-average form, where the iterates are its gradient points), or in the
        primal-average form without it that form's own average, for evaluation or for saving the
        model; on leaving, they hold the iterates again. ``step()`` and ``state_dict()`` refuse to run inside. A
        parameter that has not stepped yet keeps its value.

            with optimizer.averaged():
                evaluate(model)
        """
        self._refuse_inside_averaged("averaged()")
        if not self.keeps_average():
            raise RuntimeError("averaged() needs average=True or momentum_form='primal_average': this optimizer keeps "
                               "no average of its iterates")
        iterates = self._swap_averages()
        self._averaged_out = True
        try:
            yield
        finally:
            self._swap_averages(iterates)
            self._averaged_out = False

    def keeps_average(self) -> bool:
        """Whether :meth:`averaged` has an average to hand out: ``average=True``, or the primal-average form (the
        default in synchronous training) in some group."""
        return any(group["average"] or group["momentum_form"] == "primal_average" for group in self.param_groups)

    @torch.no_grad()
    def _swap_averages(self, iterates: dict | None = None) -> dict:
        """Swap the parameters with their averages: the kept average where there is one, else the primal-average
        form's own, xbar = y - (1 - b) w, which is not kept, so its iterates go into the returned dict on the way in
        and come back from ``iterates``."""
        entering, held = iterates is None, {}
        for index, groups in enumerate(self._scopes()):
            kept_out = 1.0 - self._tuners[index].last_momentum
            for group in groups:
                for p in group["params"]:
                    state = self.state[p] if p in self.state else {}
                    if state.get("averaged_param") is not None:
                        iterate = p.detach().clone(memory_format=torch.preserve_format)
                        p.copy_(state["averaged_param"])
                        state["averaged_param"].copy_(iterate)
                    elif group["momentum_form"] == "primal_average" and "momentum_buffer" in state:
                        if entering:
                            held[p] = p.detach().clone(memory_format=torch.preserve_format)
                            p.sub_(state["momentum_buffer"] * kept_out.to(p.device))
                        else:
                            p.copy_(iterates[p])
        return held

    def _refuse_inside_averaged(self, what: str) -> None:
        if getattr(self, "_averaged_out", False):  # (a pickle from before averaged() has no flag)
            raise RuntimeError(f"{what} inside optimizer.averaged(): the parameters hold the average, not the "
                               "iterate; leave the with-block first")

    # ----------------------------------------------------------------------------- reading the tuner
    def stats(self, scope: int | None = None) -> dict | list[dict]:
        """The tuner's current state as Python floats.

        ``scope=None``: one record, or with per_group_tuning a list of one record per group.
        ``scope=i``: the record of tuner ``i`` (a group index with per_group_tuning, else 0), always
        a dict; callers that handle both modes write ``stats(0)`` or loop over ``range(len(...))``.
        The tuned step is ``"alpha"``; ``"lr"`` holds the same value and is a deprecated alias,
        kept for one release. Reads tensors on the host: call it for logging, not inside a hot loop
        on a GPU.
        """
        if scope is not None:
            self._check_scope(scope)
            return _record(self._tuners[scope], self._settings(self._scopes()[scope][0]))
        records = [_record(state, self._settings(groups[0])) for state, groups in zip(self._tuners, self._scopes())]
        return records if self.per_group_tuning else records[0]

    def _check_scope(self, scope) -> None:
        if isinstance(scope, bool) or not isinstance(scope, int) or not 0 <= scope < len(self._tuners):
            raise ValueError(f"invalid scope={scope!r}: allowed are None or a tuner index in [0, {len(self._tuners)})")

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

    def set_staleness(self, mean_staleness: float, scope: int | None = None) -> None:
        """Report how many updates old, on average, the gradients this optimizer applies are (the hook of the
        asynchronous systems, which count it; 0 is synchronous training).

        The scale-free tuner divides its step by sqrt(1 + ``mean_staleness``) (docs/algorithm.md §8); the
        reference's step is set from curvature and ignores it (its closed loop corrects the momentum). ``scope`` as
        for :meth:`set_momentum_offset`.
        """
        check_number("mean_staleness", mean_staleness, "a number >= 0")
        if not 0.0 <= float(mean_staleness) < math.inf:
            raise ValueError(f"invalid mean_staleness={mean_staleness!r}: allowed is a finite number >= 0")
        if scope is not None:
            self._check_scope(scope)
        for index in range(len(self._tuners)) if scope is None else [scope]:
            settings = self._settings(self._scopes()[index][0])
            if float(mean_staleness) > 0.0 and settings.scale_free and settings.step_rule == "secant":
                raise ValueError(SECANT_UNDER_STALENESS)
            if float(mean_staleness) > 0.0 and settings.momentum_form == "primal_average":
                self.choose_heavy_ball(PRIMAL_AVERAGE_UNDER_STALENESS)
            state = self._tuners[index]
            value = torch.tensor(float(mean_staleness), dtype=torch.float64, device=state.device)
            self._tuners[index] = state.replace(staleness=value)

    def choose_heavy_ball(self, why: str) -> None:
        """Run heavy ball where the primal-average form was chosen by default (``momentum_form=None``), with heavy
        ball's clip (its level and trigger, in Adam's metric none) where that too was left to its default: the hook of
        what the form does not run in (the asynchronous systems, ``set_staleness``, sparse gradients), before the
        first step.

        Raises ValueError(``why``) where the form was asked for by name, or has already moved the parameters (its
        buffers hold z - xbar, not heavy ball's velocity).
        """
        switched = [index for index, group in enumerate(self.param_groups)
                    if group["momentum_form"] == "primal_average"]
        left = getattr(self, "_left_to_default", [])
        if any(index >= len(left) or "momentum_form" not in left[index] for index in switched):
            raise ValueError(why)
        scopes = [index for index, groups in enumerate(self._scopes())
                  if any(group["momentum_form"] == "primal_average" for group in groups)]
        if any(float(self._tuners[index].step) > 0.0 for index in scopes):
            raise ValueError(f"{why} (this optimizer took the form by default and has already stepped in it: call "
                             "this before the first step, or pass momentum_form='heavy_ball')")
        for index in switched:
            group = self.param_groups[index]
            options = {**group, "momentum_form": "heavy_ball"}
            if group["tuner"] == "scale_free":  # (the clip's level and trigger heavy ball's, where left to them)
                options.update({name: None for name in ("relative_clip", "clip_trigger") if name in left[index]})
            if "average" in left[index]:  # (and heavy ball's choice of the point handed out: its iterate)
                options["average"] = None
            settings = self._settings(options)
            group.update(momentum_form=settings.momentum_form, relative_clip=settings.relative_clip,
                         clip_trigger=settings.clip_trigger, average=settings.average)

    # ----------------------------------------------------------------------------- saving
    def state_dict(self) -> dict:
        self._refuse_inside_averaged("state_dict()")
        state_dict = super().state_dict()
        state_dict["tuners"] = [state.as_dict() for state in self._tuners]
        state_dict["per_group_tuning"] = self.per_group_tuning
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint; everything is validated first, so a refused load changes nothing."""
        state_dict, tuners = self._checked_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._tuners = tuners
        self._left_to_default = [frozenset() for _ in self.param_groups]  # (the groups hold what the checkpoint ran)
        # torch casts a fused group's "step" to float32 (its fused optimizers' convention); the preconditioned tuner's
        # counts of P debias the metric in float64, on their parameter's device, in every flavour.
        saved_indices = (index for group in state_dict["param_groups"] for index in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for index, p in zip(saved_indices, params):
            count = state_dict.get("state", {}).get(index, {}).get("step")
            if count is not None:
                self.state[p]["step"] = count.to(dtype=torch.float64, device=p.device)

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
        # A group saved before an option existed ran with that option's default, as torch's optimizers assume;
        # a scale-free group saved without naming its step rule or clip ran those of its time, whatever the defaults
        # are now.
        saved_groups = [{**_option_defaults(), **saved, **_resolved_options_of_old_groups(saved)}
                        for saved in saved_groups]
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
        group_of = dict(enumerate(saved for saved in saved_groups for _ in saved["params"]))
        for index, param_state in state_dict.get("state", {}).items():
            if index not in params:
                raise ValueError(f"state dict holds state for parameter {index}, which does not exist")
            needed = _BUFFERS["preconditioned" if group_of[index]["precondition"] is not None else "plain"]
            needed = needed | ({"averaged_param"} if group_of[index]["average"] else set())
            if param_state and not needed <= set(param_state):
                raise ValueError(f"state of parameter {index} has {sorted(param_state)}, its tuner needs "
                                 f"{sorted(needed)}")
            for name, value in param_state.items():
                shape = () if name == "step" else params[index].shape
                if isinstance(value, Tensor) and value.shape != shape:
                    raise ValueError(
                        f"state {name!r} of parameter {index} has shape {tuple(value.shape)}, expected {tuple(shape)}"
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
        state["_averaged_out"] = self._averaged_out
        state["_left_to_default"] = self._left_to_default
        return state


# --------------------------------------------------------------------------------- helpers
class _Batch(NamedTuple):
    """One group's parameters that have a gradient, ready for the passes (real views of complex ones)."""

    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    grad_avgs: list[Tensor]
    momenta: list[Tensor]
    flavour: str  # a key of _PASSES
    initial_params: list[Tensor]  # x_0, for the scale-free tuner only (else empty)
    second_moments: list[Tensor]  # P, for the preconditioned tuner only (which has no grad_avgs)
    steps: list[Tensor]  # P's counts, likewise
    averaged_params: list[Tensor]  # with average=True: the parameters whose average is kept, with a gradient or not
    averages: list[Tensor]  # their averages (else both empty)
    initial_norms: list[Tensor]  # ||x_0|| of each parameter in ``params``, for the scale-free tuner only (else empty)

    def preconditioned(self, previous_momentum: Tensor) -> passes.Preconditioned:
        """What the preconditioned tuner's passes read besides g (every tensor: _collect refuses sparse ones); in
        primal-average form, b (``previous_momentum``, the tuner's last applied momentum) with them."""
        lead_weight = previous_momentum if self.group["momentum_form"] == "primal_average" else None
        return passes.Preconditioned(self.params, self.initial_params, self.momenta, self.second_moments, self.steps,
                                     lead_weight)

    def trajectory(self, indices: list[int], previous_momentum: Tensor) -> passes.Trajectory | None:
        """What the scale-free tuner's sums read of the tensors at ``indices`` (None for the reference). In the
        primal-average form the distance is measured on the plain-SGD sequence z = y + b w (the momentum buffer w,
        ``previous_momentum`` b the tuner's last applied momentum), not on the parameters y."""
        if not self.initial_params or self.second_moments:
            return None
        if self.group["momentum_form"] == "primal_average":
            trajectory = passes.Trajectory(self.params, self.initial_params, None, self.momenta, previous_momentum)
        else:
            momenta = self.momenta if self.group["step_rule"] == "secant" else None  # (only the secant reads v)
            trajectory = passes.Trajectory(self.params, self.initial_params, momenta)
        return trajectory.pick(indices)


# What a parameter's state holds once it has stepped (x_0, kept by the scale-free tuners, is made when missing).
_BUFFERS = {"plain": {"grad_avg", "momentum_buffer"},
            "preconditioned": {"second_moment", "momentum_buffer", "initial_param", "step"}}

# The passes of each flavour (``passes``): (reduce, update). Sparse gradients always take the
# single-tensor one, the only flavour that handles them.
_PASSES = {
    "single_tensor": (passes.reduce_single_tensor, passes.update_single_tensor),
    "multi_tensor": (passes.reduce_multi_tensor, passes.update_multi_tensor),
    "compiled": (passes.reduce_compiled, passes.update_compiled),
}


# Pass 2 of the primal-average form, by flavour (its pass 1 is the plain one, on the plain-SGD sequence z).
_PRIMAL_AVERAGE_UPDATES = {"single_tensor": passes.update_primal_average_single_tensor,
                           "multi_tensor": passes.update_primal_average_multi_tensor,
                           "compiled": passes.update_primal_average_compiled}
# The average's pass after the update, by the batch's flavour (the compiled one takes the multi-tensor kernel).
_AVERAGE_PASSES = {"single_tensor": passes.average_single_tensor, "multi_tensor": passes.average_multi_tensor,
                   "compiled": passes.average_multi_tensor}


# The preconditioned tuner's passes: (reduce, update), in the same three flavours.
_PRECONDITIONED_PASSES = {
    "single_tensor": (passes.reduce_preconditioned_single_tensor, passes.update_preconditioned_single_tensor),
    "multi_tensor": (passes.reduce_preconditioned_multi_tensor, passes.update_preconditioned_multi_tensor),
    "compiled": (passes.reduce_preconditioned_compiled, passes.update_preconditioned_compiled),
}


def _real_view(tensor: Tensor) -> Tensor:
    """A complex tensor as its real view (two real coordinates per entry); a real one as it is."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _flavour(group: dict) -> str:
    if group["fused"]:
        return "compiled"
    return "single_tensor" if group["foreach"] is False else "multi_tensor"


def _split_sparse(batch: _Batch) -> tuple[list[int], list[int]]:
    """Indices of the tensors for the batch's flavour, and of those for the single-tensor reference."""
    dense = [i for i, g in enumerate(batch.grads) if not g.is_sparse]
    sparse = [i for i, g in enumerate(batch.grads) if g.is_sparse]
    # (dense first on every flavour: the order of the float64 sums stays the same)
    return ([], dense + sparse) if batch.flavour == "single_tensor" else (dense, sparse)


def _reduce(batch: _Batch, settings: TunerSettings, floor: Tensor | None, previous_momentum: Tensor) -> Tensor:
    """Pass 1 for one batch: its ``Sums`` vector (reads g and gbar, and x, x_0, v for the scale-free
    tuner; writes nothing). ||x_0||^2 comes from the norms the optimizer keeps, not from the pass.
    ``previous_momentum``: the tuner's last applied momentum (read by the primal-average form)."""
    if settings.preconditioned:
        sums = Sums.from_vector(_PRECONDITIONED_PASSES[batch.flavour][0](
            batch.grads, batch.preconditioned(previous_momentum), floor))
        if settings.momentum_form == "primal_average":
            sums = sums.lead_per_lr(batch.group["lr"])
    else:
        own, reference = _split_sparse(batch)
        rows = []
        for indices, reduce in ((own, _PASSES[batch.flavour][0]), (reference, passes.reduce_single_tensor)):
            if indices:
                rows.append(reduce([batch.grads[i] for i in indices], [batch.grad_avgs[i] for i in indices],
                                   count_nonzero=settings.sparsity_correction,
                                   trajectory=batch.trajectory(indices, previous_momentum)))
        sums = Sums.from_vector(passes.add_sums(rows))
        if not settings.scale_free:
            return sums.vector()
        sums = sums.weighted_by_lr(batch.group["lr"])
    # (the sum of the kept norms' squares, in the order the multi-tensor pass summed them when it took them)
    return sums._replace(initial_param_sq_norm=torch.stack(batch.initial_norms).square().sum()).vector()


def _update(batch: _Batch, coefficients: tuning.UpdateCoefficients, floor: Tensor | None) -> None:
    """Pass 2 for one batch: gbar, v and x written once."""
    group = batch.group
    decay = group["weight_decay"] if group["decoupled_weight_decay"] else 0.0
    if group["precondition"] is not None:
        _PRECONDITIONED_PASSES[batch.flavour][1](batch.grads, batch.preconditioned(coefficients.previous_momentum),
                                                 floor, coefficients, lr=group["lr"], decay=decay)
        return
    if group["momentum_form"] == "primal_average":  # (dense gradients only: _collect refuses sparse ones)
        _PRIMAL_AVERAGE_UPDATES[batch.flavour](batch.params, batch.grads, batch.grad_avgs, batch.momenta,
                                               coefficients, lr=group["lr"], decay=decay)
        return
    own, reference = _split_sparse(batch)
    for indices, update in ((own, _PASSES[batch.flavour][1]), (reference, passes.update_single_tensor)):
        if indices:
            def pick(tensors: list[Tensor]) -> list[Tensor]:
                return [tensors[i] for i in indices]

            update(pick(batch.params), pick(batch.grads), pick(batch.grad_avgs), pick(batch.momenta), coefficients,
                   lr=group["lr"], decay=decay, nesterov=group["nesterov"])


def _resolved_options_of_old_groups(saved: dict) -> dict:
    """What a group saved without naming them ran: heavy ball if saved before momentum_form existed; the reference
    tuner if saved before the tuner option existed; for a scale-free group, the step rule "secant" if it was saved
    before step_rule existed, "dog" if with step_rule=None while that meant DoG's rule; no relative clip if saved
    before relative_clip existed; a clip that acts at its own level if saved before clip_trigger existed; the first
    move its rule had then if saved before initial_distance existed; no distance hold if saved before
    hold_distance_uphill existed; no average if saved before the group named its own. Nothing else."""
    resolved = {"momentum_form": "heavy_ball"} if saved.get("momentum_form") is None else {}
    if saved.get("average") is None:  # (every group kept no average until the default kept one in the form)
        resolved["average"] = False
    if "tuner" not in saved:  # saved before the option existed, when every tuner was the reference
        return {**resolved, "tuner": "reference"}
    if saved["tuner"] != "scale_free":
        return resolved
    if "step_rule" not in saved:
        resolved["step_rule"] = "secant"
    elif saved["step_rule"] is None:
        resolved["step_rule"] = "dog"
    if saved.get("relative_clip") is None:
        resolved["relative_clip"] = math.inf
    if saved.get("clip_trigger") is None:
        resolved["clip_trigger"] = resolved.get("relative_clip", saved.get("relative_clip"))
    if saved.get("initial_distance") is None:  # (it acts on the first step only: for a checkpoint saved before one)
        rule = resolved.get("step_rule", saved["step_rule"])
        resolved["initial_distance"] = INITIAL_DISTANCE_BEFORE_THE_OPTION[rule]
    if saved.get("hold_distance_uphill") is None:  # (no rule held its distance before the option)
        resolved["hold_distance_uphill"] = False
    return resolved


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
    if settings.scale_free and group["nesterov"]:
        raise ValueError("nesterov=True is an option of tuner='reference': the scale-free tuner's step rules were "
                         "derived and measured on heavy-ball steps only; use nesterov=False, or "
                         "YellowFin.reference_variant(params, nesterov=True)")
    if settings.momentum_form == "primal_average" and group["nesterov"]:
        raise ValueError("nesterov=True does not run with momentum_form='primal_average': the form is heavy ball's, "
                         "averaged")
    return settings


def is_dtensor(tensor) -> bool:
    """A sharded ``DTensor`` (FSDP2); False where torch has no distributed support."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _device_of(groups: list[dict]) -> torch.device:
    for group in groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")


def _record(state: TunerState, settings: TunerSettings) -> dict:
    values = {name: float(getattr(state, name)) for name in (
        "mu", "alpha", "h_min", "h_max", "grad_var", "dist", "momentum_offset", "staleness"
    )}
    values["step"] = int(state.step)
    values["skipped_steps"] = int(state.skipped_steps)
    values["applied_momentum"] = float(tuning.applied_momentum(state.mu, state.momentum_offset, settings.eps))
    values["lr"] = values["alpha"]  # deprecated alias of "alpha" (see YellowFin.stats)
    if settings.scale_free:
        values["distance"] = float(state.distance)
        values["climb"] = float(state.climb_avg)  # (the running mean of cos(g, x - x_0))
    if settings.preconditioned:
        values["signal"] = float(state.signal_avg)
    elif settings.scale_free and settings.step_rule == "secant":  # (the only rule that measures it)
        values["secant_curvature"] = float(state.secant_curvature)
    return values
