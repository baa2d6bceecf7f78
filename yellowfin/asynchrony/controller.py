"""Closed-loop momentum control (docs/asynchrony.md §3).

The target is YellowFin's tuned momentum mu* (what SingleStep wants the system's momentum to be). The
plant is the running system, whose total momentum mu_T is higher than the momentum the optimizer applies
because asynchrony adds momentum of its own. The sensor measures mu_T; the controller moves the applied
momentum by negative feedback:

    mu <- mu + gain * (mu* - mu_T_hat)

Implementation: the controller integrates an additive offset and drives YellowFin's momentum-offset hook,
so the applied momentum is mu* + offset. With a constant mu* this is exactly the update above (mu
starts at mu*); when mu* moves, the applied momentum follows it at once and the integrator only has to
learn the part asynchrony adds, which changes slowly.
"""

from __future__ import annotations

import math
from typing import Callable

from ..tuned import is_tuner


def closed_loop_offset(offset: float, mu_target: float, mu_sensed: float, gain: float,
                       mu_min: float, mu_max: float) -> float:
    """One integral-control step on the momentum offset, clamped so mu* + offset stays in range."""
    if not (math.isfinite(mu_target) and math.isfinite(mu_sensed)):
        return offset
    new_offset = offset + gain * (mu_target - mu_sensed)
    return min(max(new_offset, mu_min - mu_target), mu_max - mu_target)


def yellowfin_target(optimizer) -> float:
    """YellowFin's tuned momentum mu* (global tuning, or the first group's under per-group tuning)."""
    return float(optimizer.stats(0)["mu"])


def momentum_trace(optimizer) -> dict:
    """The trace fields every asynchronous system records: the tuned target ``mu_target`` and the
    momentum applied (target plus offset) ``mu_applied``; empty for an optimizer without a tuner."""
    if not is_tuner(optimizer):
        return {}
    tuned = optimizer.stats(0)
    return {"mu_target": float(tuned["mu"]), "mu_applied": float(tuned["applied_momentum"])}


def set_yellowfin_offset(optimizer, offset: float) -> None:
    optimizer.set_momentum_offset(float(offset))


class ClosedLoopMomentum:
    """Drives an optimizer's momentum offset so that the sensed total momentum tracks the target.

    ``sensor`` is anything with an ``estimate`` property (a :class:`MomentumSensor`). By default the
    target and the actuator are YellowFin's (``opt.stats()['mu']`` and ``opt.set_momentum_offset``);
    pass ``target_fn``/``apply_fn`` to close the loop around something else.

    Defaults (gain 0.01, applied momentum clamped to [-0.5, 0.99], first correction after 20 sensor
    observations) were chosen by the gain sweep in benchmarks/asynchrony/gain_sweep.py, see
    docs/asynchrony.md.
    """

    def __init__(self, optimizer, sensor, gain: float = 0.01, mu_min: float = -0.5,
                 mu_max: float = 0.99, warmup_observations: int = 20, every: int = 1,
                 target_fn: Callable[[object], float] | None = None,
                 apply_fn: Callable[[object, float], None] | None = None):
        if not mu_min < mu_max:
            raise ValueError("mu_min must be below mu_max")
        self.optimizer = optimizer
        self.sensor = sensor
        self.gain = float(gain)
        self.mu_min = float(mu_min)
        self.mu_max = float(mu_max)
        self.warmup_observations = int(warmup_observations)
        self.every = max(1, int(every))
        self.target_fn = target_fn or yellowfin_target
        self.apply_fn = apply_fn or set_yellowfin_offset
        self.offset = 0.0
        self.calls = 0
        self.corrections = 0
        self.last_target = float("nan")
        self.last_sensed = float("nan")

    @property
    def applied_momentum(self) -> float:
        return self.last_target + self.offset

    def update(self) -> float:
        """Call after each optimizer step (and sensor observation). Returns the offset now applied."""
        self.calls += 1
        if self.calls % self.every:
            return self.offset
        target = self.target_fn(self.optimizer)
        sensed = self.sensor.estimate
        self.last_target, self.last_sensed = target, sensed
        if self.sensor.observations >= self.warmup_observations:
            self.offset = closed_loop_offset(self.offset, target, sensed, self.gain,
                                             self.mu_min, self.mu_max)
            self.corrections += 1
        else:
            # Keep the applied momentum in range even before the first correction.
            self.offset = closed_loop_offset(self.offset, target, target, 0.0, self.mu_min, self.mu_max)
        self.apply_fn(self.optimizer, self.offset)
        return self.offset

    def state_dict(self) -> dict:
        return {"offset": self.offset, "gain": self.gain, "mu_min": self.mu_min, "mu_max": self.mu_max,
                "warmup_observations": self.warmup_observations, "every": self.every,
                "calls": self.calls, "corrections": self.corrections,
                "last_target": self.last_target, "last_sensed": self.last_sensed,
                "sensor": self.sensor.state_dict() if hasattr(self.sensor, "state_dict") else None}

    def load_state_dict(self, state: dict) -> None:
        for key in ("offset", "gain", "mu_min", "mu_max", "last_target", "last_sensed"):
            setattr(self, key, float(state[key]))
        for key in ("warmup_observations", "every", "calls", "corrections"):
            setattr(self, key, int(state[key]))
        if state.get("sensor") is not None and hasattr(self.sensor, "load_state_dict"):
            self.sensor.load_state_dict(state["sensor"])
        self.apply_fn(self.optimizer, self.offset)


def closed_loop_for(optimizer, num_coordinates: int, num_workers: int, sensor_step: str = "algorithmic",
                    gain: float = 0.01, sensor_subset: int = 512, seed: int = 0, history: int = 64,
                    **controller_options) -> ClosedLoopMomentum:
    """A sensor plus controller for a YellowFin optimizer running with ``num_workers`` workers.

    ``sensor_step`` "algorithmic" credits each gradient with the tuned alpha (what the optimizer
    applies); "effective" with alpha / M, the step of the asynchrony model (docs/asynchrony.md §1-§2).
    """
    from .sensor import MomentumSensor

    if sensor_step not in ("algorithmic", "effective"):
        raise ValueError("sensor_step must be 'algorithmic' or 'effective'")
    scale = 1.0 if sensor_step == "algorithmic" else 1.0 / num_workers
    sensor = MomentumSensor(num_coordinates, sensor_subset, seed=seed, step_scale=scale, history=history)
    return ClosedLoopMomentum(optimizer, sensor, gain=gain, **controller_options)
