"""Reading a tuner from outside the optimizer: what the asynchronous systems, their controller,
telemetry and the benchmarks need to know of ``stats()``.

``optimizer.stats(scope)`` is tuner ``scope``'s record (the only tuner's under global tuning, group
``scope``'s under per-group tuning); ``tuned_records`` is every record as a list, whatever the tuning.
"""

from __future__ import annotations


def is_tuner(optimizer) -> bool:
    """Whether ``optimizer`` is YellowFin-like: it reports its tuned state and takes a momentum offset."""
    return hasattr(optimizer, "stats") and hasattr(optimizer, "set_momentum_offset")


def refuse_under_asynchrony(optimizer, num_workers: int) -> None:
    """Refuse a tuner that cannot run on stale gradients (with more than one worker).

    Under simulated staleness (4 or more workers) the scale-free tuner diverged where the reference did not, with
    either step rule (docs/tuner.md §6, §8): its secant pairs each gradient with the last step, which a gradient
    computed on the model of tau versions ago breaks, and DoG's step, set for fresh gradients, meets the extra
    momentum that asynchrony adds. So it is refused here until its rules account for staleness.
    """
    if num_workers > 1 and is_tuner(optimizer) and any(
            group.get("tuner") == "scale_free" for group in optimizer.param_groups):
        raise ValueError(
            "tuner='scale_free' cannot run under asynchrony yet: with stale gradients it diverged under simulated "
            "staleness, with either step rule (docs/tuner.md §8); use the default tuner here")


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
