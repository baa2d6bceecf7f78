"""Asynchronous training and closed-loop momentum tuning (docs/asynchrony.md).

Closed-loop YellowFin on each system is one flag, ``closed_loop=True``:

    StalenessSimulator(model, YellowFin(model.parameters()), num_workers=16, closed_loop=True)
    ParameterServer(model, YellowFin(model.parameters()), loss_fn, batch_factory, num_workers=4,
                    closed_loop=True)
    Hogwild(model, loss_fn, batch_factory, num_workers=4, closed_loop=True)

The optimizer knows nothing about this package; the loop talks to it through ``opt.stats()`` and
``opt.set_momentum_offset``.
"""

from .controller import ClosedLoopMomentum, closed_loop_for, closed_loop_offset
from .hogwild import Hogwild
from .parameter_server import ParameterServer
from .sensor import MomentumSensor, median_ratio, momentum_residual
from .simulator import StalenessSchedule, StalenessSimulator, step_size_of
from .workers import WorkerFailed

__all__ = [
    "ClosedLoopMomentum", "closed_loop_for", "Hogwild", "closed_loop_offset", "MomentumSensor", "median_ratio",
    "momentum_residual", "ParameterServer", "StalenessSchedule", "StalenessSimulator", "step_size_of",
    "WorkerFailed",
]
