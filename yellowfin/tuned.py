"""Reading a tuner from outside the optimizer: what the asynchronous systems, their controller,
telemetry and the benchmarks need to know of ``stats()``.

``optimizer.stats(scope)`` is tuner ``scope``'s record (the only tuner's under global tuning, group
``scope``'s under per-group tuning); ``tuned_records`` is every record as a list, whatever the tuning.
"""

from __future__ import annotations

import math

from .state import SECANT_UNDER_STALENESS


def is_tuner(optimizer) -> bool:
    """Whether ``optimizer`` is YellowFin-like: it reports its tuned state and takes a momentum offset."""
    return hasattr(optimizer, "stats") and hasattr(optimizer, "set_momentum_offset")


def refuse_under_asynchrony(optimizer, num_workers: int, closed_loop: bool = False,
                            tunes_the_run: bool = True) -> None:
    """Refuse a tuner where it cannot run on stale gradients (with more than one worker).

    The scale-free tuner runs under asynchrony only with its step cut for the gradients' mean staleness (the
    system reports it: ``report_staleness``) and with the closed loop on the momentum (docs/tuner.md §10, "Under
    staleness"): uncut, its step ran away with 4 and 8 workers; cut but open-loop, it failed with round-robin
    staleness. Its secant rule pairs each gradient with the last step, which a gradient computed tau versions ago
    breaks, so it is refused. ``tunes_the_run=False``: the tuner steps a copy of the parameters of its own
    (Hogwild), so the distance the scale-free step is calibrated on is not the run's, and it is refused.
    """
    if num_workers <= 1 or not is_tuner(optimizer):
        return
    rules = {group.get("step_rule") for group in optimizer.param_groups if group.get("tuner") == "scale_free"}
    if not rules:
        return
    if not tunes_the_run:
        raise ValueError("tuner='scale_free' cannot tune Hogwild: the tuner steps a copy of the parameters of its "
                         "own, and the scale-free step is calibrated on the distance its parameters travel, which "
                         "is not the run's; use the default tuner here")
    if "secant" in rules:
        raise ValueError(SECANT_UNDER_STALENESS)
    if not closed_loop:
        raise ValueError("tuner='scale_free' runs under asynchrony only with closed_loop=True: open-loop, its step "
                         "failed under round-robin staleness even cut for the delay (docs/tuner.md §10)")


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
