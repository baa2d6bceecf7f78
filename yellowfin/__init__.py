"""YellowFin: momentum and learning rate for SGD, tuned automatically while training runs.

    measure (measurements.py) -> tune (tuning.py) -> apply (passes.py), dispatched by optimizer.py
"""

from .optimizer import YellowFin
from .state import TunerSettings, TunerState

__all__ = ["YellowFin", "TunerSettings", "TunerState"]
__version__ = "0.1.0"
