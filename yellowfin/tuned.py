"""Reading a tuner's state from outside the optimizer: the one way callers (the asynchronous systems,
their controller, telemetry) get at ``stats()``, whatever shape it has.

``stats()`` gives one record (global tuning) or a list of records (``per_group_tuning``), and a newer
``stats(scope)`` gives tuner ``scope``'s record directly. The tuned step is ``'lr'`` in older records and
``'alpha'`` in newer ones (with ``'lr'`` kept as an alias); records from :func:`tuned_record` always carry
``'alpha'`` and ``'applied_momentum'``, so callers read those and need not know which version they got.
"""

from __future__ import annotations

import functools
import inspect


def is_tuner(optimizer) -> bool:
    """Whether ``optimizer`` is YellowFin-like: it reports its tuned state and takes a momentum offset."""
    return hasattr(optimizer, "stats") and hasattr(optimizer, "set_momentum_offset")


def _stats_takes_scope(optimizer) -> bool:
    stats_function = getattr(type(optimizer), "stats", None)
    if inspect.isfunction(stats_function):
        return _function_takes_scope(stats_function)
    return "scope" in inspect.signature(optimizer.stats).parameters


@functools.lru_cache(maxsize=None)
def _function_takes_scope(function) -> bool:  # cached: controllers ask at every update
    return "scope" in inspect.signature(function).parameters


def tuned_records(optimizer) -> list[dict]:
    """Every record ``optimizer.stats()`` gives, as a list (one record per tuner), unchanged."""
    stats = optimizer.stats()
    return stats if isinstance(stats, list) else [stats]


def tuned_record(optimizer, scope: int = 0) -> dict:
    """Tuner ``scope``'s record (the only tuner's under global tuning, group ``scope``'s under per-group
    tuning), with ``'alpha'`` (the tuned step) and ``'applied_momentum'`` (mu plus the closed-loop offset)
    present whichever version of ``stats()`` produced it: ``'alpha'`` defaults to ``'lr'``, and
    ``'applied_momentum'`` to ``'mu'`` (no offset)."""
    if _stats_takes_scope(optimizer):
        record = optimizer.stats(scope=scope)
    else:
        records = tuned_records(optimizer)
        if not 0 <= scope < len(records):
            raise IndexError(f"scope {scope} is out of range: this optimizer has {len(records)} tuner(s), "
                             f"so scope must be in 0..{len(records) - 1}")
        record = records[scope]
    record = dict(record)
    if "lr" in record:  # (a record without it, from a stand-in optimizer, stays as it is)
        record.setdefault("alpha", record["lr"])
    if "mu" in record:
        record.setdefault("applied_momentum", record["mu"])
    return record


def step_size_of(optimizer) -> float:
    """The step size alpha the optimizer applies in the lr-outside form x <- x - alpha v.

    YellowFin: group lr multiplier times the tuned alpha. Other optimizers: the first group's lr (for
    Adam this is only nominal; a momentum sensor is then a diagnostic).
    """
    multiplier = float(optimizer.param_groups[0].get("lr", 1.0))
    if is_tuner(optimizer):
        return multiplier * float(tuned_record(optimizer)["alpha"])
    return multiplier
