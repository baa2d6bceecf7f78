"""Getting the tuner's state out: ``stats()`` records to TensorBoard or any callable."""

from __future__ import annotations

from typing import Callable, Union

from torch.optim import Optimizer

from .tuned import tuned_records

Sink = Union[Callable[[dict, int], None], "SummaryWriter"]  # noqa: F821


def log_stats(optimizer: Optimizer, sink: Sink, every: int = 10, prefix: str = "yellowfin"):
    """Send ``optimizer.stats()`` to ``sink`` after every ``every``-th step.

    ``sink`` is a TensorBoard ``SummaryWriter`` (anything with ``add_scalar``), which gets one
    scalar per statistic under ``prefix/`` (``prefix/group{i}/`` with per-group tuning), or a
    callable ``sink(record, step)`` called once per record. Returns the hook handle; call
    ``handle.remove()`` to stop. Reading the statistics synchronises with the device, which is
    why it happens every N steps, not every step.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"invalid every={every!r}: allowed range is an integer >= 1")
    calls = 0

    def hook(opt, args, kwargs):
        nonlocal calls
        calls += 1
        if calls % every:
            return
        records = tuned_records(opt)
        for index, record in enumerate(records):
            if hasattr(sink, "add_scalar"):
                tag = prefix if len(records) == 1 else f"{prefix}/group{index}"
                for name, value in record.items():
                    sink.add_scalar(f"{tag}/{name}", value, calls)
            else:
                sink(dict(record, group=index) if len(records) > 1 else record, calls)

    return optimizer.register_step_post_hook(hook)
