"""Simulated asynchrony: every gradient is computed on the model as it was tau updates ago.

This is exactly the queue model of docs/asynchrony.md §1, cheap and deterministic given a seed, and it wraps
any torch optimizer, so Adam, momentum SGD and YellowFin run under the same staleness sequence.

    sim = StalenessSimulator(model, optimizer, num_workers=16, staleness="geometric", seed=0)
    for batch in batches:
        loss = sim.step(task.loss, batch)
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..tuned import refuse_under_asynchrony, report_staleness, step_size_of
from .controller import closed_loop_for, momentum_trace
from .flat import flat_parameters, load_gradients, load_parameters, loss_and_flat_gradient
from .sensor import MomentumSensor


class StalenessSchedule:
    """Draws the staleness of each update, deterministically from a seed.

    - ``"fixed"``: tau = M - 1 (M workers in round robin: each gradient was computed M - 1 updates ago);
    - ``"geometric"``: P(tau = l) = (1 - q) q^l with q = 1 - 1/M, truncated at ``max_staleness``;
    - ``"none"``: tau = 0 (synchronous, for comparison).
    """

    KINDS = ("fixed", "geometric", "none")

    def __init__(self, num_workers: int, kind: str = "fixed", seed: int = 0,
                 max_staleness: int | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"staleness must be one of {self.KINDS}, got {kind!r}")
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.num_workers = int(num_workers)
        self.kind = kind
        self.max_staleness = int(max_staleness if max_staleness is not None else
                                 (0 if kind == "none" else
                                  num_workers - 1 if kind == "fixed" else 8 * num_workers))
        self._rng = np.random.default_rng(seed)

    def draw(self) -> int:
        if self.kind == "none" or self.num_workers == 1:
            return 0
        if self.kind == "fixed":
            return self.num_workers - 1
        # numpy's geometric counts trials to the first success (>= 1); tau counts failures.
        tau = int(self._rng.geometric(1.0 / self.num_workers)) - 1
        return min(tau, self.max_staleness)

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]


class StalenessSimulator:
    """Wraps a model and any torch optimizer; applies gradients computed on stale model versions.

    ``closed_loop=True`` (YellowFin) attaches a sensor and a :class:`ClosedLoopMomentum` controller
    (``sensor_step`` and ``gain`` as in :func:`closed_loop_for`); it is then ``sensors[0]``.
    ``sensors`` (optional) are :class:`MomentumSensor` s fed with the iterates and with each gradient at
    the version it was computed on; ``controller`` (optional) is a :class:`ClosedLoopMomentum` updated
    after each step. ``trace`` records per-step staleness, loss, step size and sensor estimates.
    """

    def __init__(self, model: nn.Module, optimizer, num_workers: int, staleness: str = "fixed",
                 seed: int = 0, max_staleness: int | None = None,
                 sensors: Iterable[MomentumSensor] = (), controller=None, closed_loop: bool = False,
                 sensor_step: str = "algorithmic", gain: float = 0.01,
                 step_size_fn: Callable[[object], float] = step_size_of, trace_every: int = 1):
        refuse_under_asynchrony(optimizer, num_workers, closed_loop=closed_loop or controller is not None)
        self.model = model
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.schedule = StalenessSchedule(num_workers, staleness, seed, max_staleness)
        self.sensors = list(sensors)
        if closed_loop and controller is None:
            numel = sum(p.numel() for p in self.params)
            controller = closed_loop_for(optimizer, numel, num_workers, sensor_step, gain, seed=seed)
        if controller is not None and controller.sensor not in self.sensors:
            self.sensors.insert(0, controller.sensor)
        for sensor in self.sensors:  # a gradient from tau updates ago needs versions s-1..s+1
            sensor.history = max(sensor.history, self.schedule.max_staleness + 3)
        self.controller = controller
        self.step_size_fn = step_size_fn
        self.trace_every = max(1, int(trace_every))
        self.version = 0
        self._history: collections.deque[tuple[int, torch.Tensor]] = collections.deque(
            maxlen=self.schedule.max_staleness + 1)
        self._remember_current()
        self.staleness_counts: collections.Counter[int] = collections.Counter()
        self.trace: list[dict] = []

    # -- plumbing -------------------------------------------------------------------------
    def _remember_current(self) -> None:
        flat = flat_parameters(self.params).clone()
        self._history.append((self.version, flat))
        for sensor in self.sensors:
            sensor.record_iterate(self.version, flat)

    def stale_gradient(self, loss_fn: Callable, batch, tau: int) -> tuple[int, torch.Tensor, float]:
        """Gradient (flat) and loss at the version ``tau`` updates ago (or the oldest kept)."""
        index = max(0, len(self._history) - 1 - tau)
        stale_version, stale_flat = self._history[index]
        current = self._history[-1][1]
        load_parameters(self.params, stale_flat)
        grad, loss = loss_and_flat_gradient(loss_fn, self.model, self.params, batch)
        load_parameters(self.params, current)
        return stale_version, grad, loss

    # -- the loop -------------------------------------------------------------------------
    def step(self, loss_fn: Callable[[nn.Module, object], torch.Tensor], batch) -> float:
        """One asynchronous update. Returns the loss measured at the stale model."""
        tau = self.schedule.draw()
        stale_version, grad, loss = self.stale_gradient(loss_fn, batch, tau)
        actual_tau = self.version - stale_version
        self.staleness_counts[actual_tau] += 1
        report_staleness(self.optimizer, self.staleness_counts)
        load_gradients(self.params, grad)
        self.optimizer.step()
        step = self.step_size_fn(self.optimizer)
        for sensor in self.sensors:
            sensor.record_step(self.version, step)
        self.version += 1
        self._remember_current()
        # From here the same plug-in sequence as ServerCore.apply_gradient, on purpose (docs/asynchrony.md,
        # "Layout"): observe the gradient at its version, update the controller, trace.
        for sensor in self.sensors:
            sensor.observe(stale_version, grad)
        if self.controller is not None:
            self.controller.update()
        if self.version % self.trace_every == 0:
            self.trace.append(self._trace_record(loss, actual_tau, step))
        return loss

    def _trace_record(self, loss: float, tau: int, step: float) -> dict:
        record = {"version": self.version, "loss": loss, "staleness": tau, "step": step}
        for i, sensor in enumerate(self.sensors):
            record[f"mu_hat_{i}"] = sensor.estimate
        record.update(momentum_trace(self.optimizer))
        return record

    def run(self, loss_fn, batches, num_steps: int, callback: Callable | None = None) -> list[float]:
        losses = []
        iterator = iter(batches)
        for _ in range(num_steps):
            losses.append(self.step(loss_fn, next(iterator)))
            if callback is not None and callback(self) is False:
                break
        return losses

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the model and the optimizer (save those next to it): the stale versions, the
        staleness stream, the sensors and the closed-loop controller (offset, counters, its sensor)."""
        return {"version": self.version, "history": list(self._history),
                "schedule": self.schedule.state_dict(),
                "staleness_counts": dict(self.staleness_counts),
                "sensors": [sensor.state_dict() for sensor in self.sensors],
                "controller": self.controller.state_dict() if self.controller is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.version = state["version"]
        self._history.clear()
        self._history.extend(state["history"])
        self.schedule.load_state_dict(state["schedule"])
        self.staleness_counts = collections.Counter(state["staleness_counts"])
        saved_sensors = state.get("sensors") or []
        if len(saved_sensors) != len(self.sensors):
            raise ValueError(f"checkpoint has {len(saved_sensors)} sensors, this simulator {len(self.sensors)}")
        for sensor, saved in zip(self.sensors, saved_sensors):
            sensor.load_state_dict(saved)
        if (state.get("controller") is None) != (self.controller is None):
            raise ValueError("checkpoint and simulator disagree on whether the loop is closed")
        if self.controller is not None:
            # The controller's sensor is sensors[0] and was restored above; the controller's own copy of
            # the sensor state is the same object's, so restore the counters and re-apply the offset.
            self.controller.load_state_dict(state["controller"])
