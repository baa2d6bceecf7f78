"""Asynchronous training and closed-loop momentum tuning (docs/asynchrony.md).

Closed-loop YellowFin on each system is one flag, ``closed_loop=True``:

    StalenessSimulator(model, YellowFin(model.parameters()), num_workers=16, closed_loop=True)
    ParameterServer(model, YellowFin(model.parameters()), loss_fn, batch_factory, num_workers=4,
                    closed_loop=True)
    Hogwild(model, loss_fn, batch_factory, num_workers=4, closed_loop=True)

The optimizer knows nothing about this package; the loop reads it through :mod:`yellowfin.tuned`
(``opt.stats()``) and drives it through ``opt.set_momentum_offset``.

Modules: ``flat`` (flat views of parameters and gradients), ``sensor`` (measure the total momentum),
``controller`` (close the loop), ``simulator`` (simulated staleness), ``server_core`` (a parameter
server's update path), ``parameter_server`` (that core fed by local worker processes), ``hogwild``
(lock-free shared memory), ``workers`` (what the local worker processes share).
"""

from ..tuned import step_size_of
from .controller import ClosedLoopMomentum, closed_loop_for, closed_loop_offset
from .hogwild import Hogwild
from .parameter_server import ParameterServer
from .sensor import MomentumSensor, median_ratio, momentum_residual
from .server_core import ServerCore
from .simulator import StalenessSchedule, StalenessSimulator
from .workers import WorkerFailed

__all__ = [
    "ClosedLoopMomentum", "closed_loop_for", "Hogwild", "closed_loop_offset", "MomentumSensor", "median_ratio",
    "momentum_residual", "ParameterServer", "ServerCore", "StalenessSchedule", "StalenessSimulator", "step_size_of",
    "WorkerFailed",
]
