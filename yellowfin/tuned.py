"""Reading a tuner from outside the optimizer: what the asynchronous systems, their controller,
telemetry and the benchmarks need to know of ``stats()``.

``optimizer.stats(scope)`` is tuner ``scope``'s record (the only tuner's under global tuning, group
``scope``'s under per-group tuning); ``tuned_records`` is every record as a list, whatever the tuning.
"""

from __future__ import annotations

import math

from . import tuning
from .state import PRIMAL_AVERAGE_UNDER_STALENESS, SECANT_UNDER_STALENESS


def is_tuner(optimizer) -> bool:
    """Whether ``optimizer`` is YellowFin-like: it reports its tuned state and takes a momentum offset."""
    return hasattr(optimizer, "stats") and hasattr(optimizer, "set_momentum_offset")


def refuse_under_asynchrony(optimizer, num_workers: int, closed_loop: bool = False,
                            workers_apply_heavy_ball: bool = False) -> None:
    """Refuse a tuner where it cannot run on stale gradients (with more than one worker), or where the system applies
    an update other than the tuner's.

    The scale-free tuner runs under asynchrony only with its step cut for the gradients' mean staleness (the
    system reports it: ``report_staleness``) and with the closed loop on the momentum (docs/tuner.md §10, "Under
    staleness"): uncut, its step ran away with 4 and 8 workers; cut but open-loop, it failed with round-robin
    staleness. Its secant rule pairs each gradient with the last step, which a gradient computed tau versions ago
    breaks, so it is refused. The primal-average form runs in synchronous training only: where it was taken by
    default the tuner runs heavy ball instead (``YellowFin.choose_heavy_ball``), where it was asked for it is refused.
    ``workers_apply_heavy_ball=True`` (Hogwild): the workers, not the tuner, apply the
    update, as heavy ball in the plain metric with the tuner's (mu, alpha) and its clip of the gradient
    (``update_clip_levels``), v <- m v + s g; x <- x - alpha v, and nothing else; a tuner whose update is another
    is refused there with any number of workers (``_refuse_other_updates``).
    """
    if not is_tuner(optimizer):
        return
    forms = {group.get("momentum_form") for group in optimizer.param_groups}
    if "primal_average" in forms and (num_workers > 1 or workers_apply_heavy_ball):
        choose_heavy_ball = getattr(optimizer, "choose_heavy_ball", None)
        if choose_heavy_ball is None:
            raise ValueError(PRIMAL_AVERAGE_UNDER_STALENESS)
        choose_heavy_ball(PRIMAL_AVERAGE_UNDER_STALENESS)  # (heavy ball where the form was taken by default)
    if workers_apply_heavy_ball:
        _refuse_other_updates(optimizer)
    if num_workers <= 1:
        return
    rules = {group.get("step_rule") for group in optimizer.param_groups if group.get("tuner") == "scale_free"}
    if not rules:
        return
    if "secant" in rules:
        raise ValueError(SECANT_UNDER_STALENESS)
    if not closed_loop:
        raise ValueError("tuner='scale_free' runs under asynchrony only with closed_loop=True: open-loop, its step "
                         "failed under round-robin staleness even cut for the delay (docs/tuner.md §10); pass "
                         "closed_loop=True, or use YellowFin.reference_variant for an open-loop run")


def _refuse_other_updates(optimizer) -> None:
    """Refuse a tuner whose update is not plain heavy ball with one (mu, alpha), for workers that apply only that."""
    groups = optimizer.param_groups
    if any(group.get("precondition") for group in groups):
        raise ValueError("precondition='adam' cannot tune Hogwild: its workers apply heavy ball in the plain metric, "
                         "and the preconditioned tuner's step is for x <- x - alpha M^(-1/2) v in Adam's metric, whose "
                         "second moment M every worker would have to share and update; use the plain metric (the "
                         "default tuner) in Hogwild, or the parameter server")
    for option, wrong in (("nesterov", True), ("maximize", True)):
        if any(group.get(option) == wrong for group in groups):
            raise ValueError(f"{option}=True cannot tune Hogwild: its workers apply plain heavy ball "
                             "(v <- m v + g; x <- x - alpha v)")
    if any(group.get("weight_decay", 0.0) != 0.0 for group in groups):
        raise ValueError("weight_decay cannot tune Hogwild: its workers apply plain heavy ball on the gradient alone "
                         "(v <- m v + g; x <- x - alpha v); add the decay to the loss instead")
    if len({group.get("lr", 1.0) for group in groups}) > 1 or (
            getattr(optimizer, "per_group_tuning", False) and len(groups) > 1):
        raise ValueError("Hogwild's workers apply one (mu, alpha) to every parameter: use one tuning scope and one lr "
                         "multiplier for all parameter groups")


def update_clip_levels(optimizer) -> tuple[float, float, float]:
    """(clip_norm, trigger, level): how the tuner's next step would scale the gradient it applies, as absolute norms.
    A gradient of norm above ``clip_norm`` is cut to it (the manual clip, any tuner); then, if its norm exceeds
    ``trigger``, it is applied with norm ``level`` (the scale-free tuner's relative clip, ``tuning.clipping_scales``).
    Infinite where a clip does not act. For systems whose workers apply the update themselves (Hogwild)."""
    if not hasattr(optimizer, "tuner_state"):
        return math.inf, math.inf, math.inf
    settings = optimizer._settings(optimizer.param_groups[0])
    clip_norm = math.inf if settings.clip_norm is None else float(settings.clip_norm)
    if not tuning.relative_clip_acts(settings):
        return clip_norm, math.inf, math.inf
    state = optimizer.tuner_state(0)
    trigger, level = tuning.relative_clip_levels(tuning.relative_clip_mean_square(state, settings), state.step >= 1.0,
                                                 settings, state.staleness)
    return clip_norm, float(trigger), float(level)


def mean_staleness(staleness_counts) -> float:
    """The mean of a staleness histogram ({staleness: count}); NaN when it is empty."""
    total = sum(staleness_counts.values())
    return sum(tau * count for tau, count in staleness_counts.items()) / total if total else math.nan


def report_staleness(optimizer, staleness_counts) -> None:
    """Tell a tuner the mean staleness of the gradients applied so far ({staleness: count}), before it applies
    the next one (which is counted); a no-op for an optimizer without ``set_staleness``."""
    set_staleness = getattr(optimizer, "set_staleness", None)
    mean = mean_staleness(staleness_counts)
    if set_staleness is not None and not math.isnan(mean):
        set_staleness(mean)


def tuned_records(optimizer) -> list[dict]:
    """Every tuner's record, one per tuner (a single one under global tuning)."""
    stats = optimizer.stats()
    return stats if isinstance(stats, list) else [stats]


def step_size_of(optimizer) -> float:
    """The step size alpha the optimizer applies in the lr-outside form x <- x - alpha v.

    YellowFin: group lr multiplier times the tuned alpha. Other optimizers: the first group's lr (for
    Adam this is only nominal; a momentum sensor is then a diagnostic).
    """
    multiplier = float(optimizer.param_groups[0].get("lr", 1.0))
    if is_tuner(optimizer):
        return multiplier * float(optimizer.stats(0)["alpha"])
    return multiplier
