"""The parameter server's update path, whoever delivers the gradients: validate a pushed gradient, apply
it with the optimizer, record its staleness, feed the momentum sensor, update the closed-loop controller,
keep a trace, and checkpoint all of it atomically.

It knows nothing about processes: :class:`~yellowfin.asynchrony.ParameterServer` feeds it from local
worker processes, :class:`~yellowfin.distributed.ray_server.ParameterServerActor` from Ray actors.
"""

from __future__ import annotations

import collections
import logging
import time

import torch
from torch import nn

from ..files import load_all_or_nothing, load_checkpoint_file, save_checkpoint_file
from ..tuned import is_tuner, mean_staleness, refuse_under_asynchrony, report_staleness, step_size_of
from .controller import ClosedLoopMomentum, closed_loop_for, momentum_trace
from .flat import flat_parameters, gradient_problem, load_gradients
from .sensor import MomentumSensor

logger = logging.getLogger(__name__)


class ServerCore:
    """Applies flat gradients (numpy arrays) to ``model`` in the order they are handed in.

    Arguments:
        model, optimizer: the server's model and any torch optimizer over its parameters.
        num_workers: how many workers push (sizes the closed-loop sensor: step alpha / M, history).
        closed_loop: attach a momentum sensor and a :class:`ClosedLoopMomentum` controller (YellowFin).
        sensor_step: "algorithmic" (alpha) or "effective" (alpha / M) for the controller's sensor.
        checkpoint_path / checkpoint_every: atomic checkpoints of model, optimizer, controller, sensor.
        trace_every: keep a trace record every so many updates.
    """

    def __init__(self, model: nn.Module, optimizer, num_workers: int, seed: int = 0, closed_loop: bool = False,
                 controller: ClosedLoopMomentum | None = None, sensor: MomentumSensor | None = None,
                 sensor_step: str = "algorithmic", sensor_subset: int = 512, gain: float = 0.01,
                 checkpoint_path: str | None = None, checkpoint_every: int = 0, trace_every: int = 1):
        refuse_under_asynchrony(optimizer, num_workers, closed_loop=closed_loop or controller is not None)
        self.model = model
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        flat = flat_parameters(self.params)
        self.numel = flat.numel()
        self.dtype = flat.numpy().dtype
        if closed_loop and controller is None:
            controller = closed_loop_for(optimizer, self.numel, num_workers, sensor_step, gain,
                                         sensor_subset, seed=seed, history=16 * num_workers + 8)
        if controller is not None and sensor is None:
            sensor = controller.sensor
        self.sensor = sensor
        self.controller = controller
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = int(checkpoint_every)
        self.trace_every = max(1, int(trace_every))

        self.version = 0
        self.staleness_counts: collections.Counter[int] = collections.Counter()
        self.rejected: list[tuple[int, str]] = []
        self.trace: list[dict] = []
        self.applied_per_worker: collections.Counter[int] = collections.Counter()

    # -- the update path ------------------------------------------------------------------
    def _publish(self) -> None:
        """The parameters now are version ``self.version``: share them, and let the sensor see them."""
        flat = flat_parameters(self.params)
        self._share(flat)
        if self.sensor is not None:
            self.sensor.record_iterate(self.version, flat)

    def _share(self, flat: torch.Tensor) -> None:
        """Hand version ``self.version`` to the workers; a runner whose workers pull it (local shared
        memory) overrides this, one that sends it in its replies (Ray) need not."""

    def apply_gradient(self, worker_id: int, pulled_version: int, grad, loss: float = float("nan")) -> bool:
        """Validate and apply one pushed gradient. Returns False (and logs) if rejected."""
        problem = gradient_problem(grad, self.numel, self.dtype)
        if problem is None and not (isinstance(pulled_version, int) and 0 <= pulled_version <= self.version):
            problem = f"pulled version {pulled_version!r} is not a known version"
        if problem is not None:
            logger.error("rejected gradient from worker %s: %s", worker_id, problem)
            self.rejected.append((worker_id, problem))
            return False
        flat_grad = torch.from_numpy(grad)
        load_gradients(self.params, flat_grad)
        staleness = self.version - pulled_version
        self.staleness_counts[staleness] += 1
        report_staleness(self.optimizer, self.staleness_counts)
        self.optimizer.step()
        if self.sensor is not None:
            self.sensor.record_step(self.version, step_size_of(self.optimizer))
        self.version += 1
        self._publish()
        self.applied_per_worker[worker_id] += 1
        if self.sensor is not None:  # the plug-in sequence StalenessSimulator.step follows too
            self.sensor.observe(pulled_version, flat_grad)
        if self.controller is not None:
            self.controller.update()
        if self.version % self.trace_every == 0:
            self.trace.append(self._trace_record(worker_id, staleness, loss))
        if self.checkpoint_path and self.checkpoint_every and self.version % self.checkpoint_every == 0:
            self.save_checkpoint(self.checkpoint_path)
        return True

    def _trace_record(self, worker_id: int, staleness: int, loss: float) -> dict:
        record = {"version": self.version, "worker": worker_id, "staleness": staleness, "loss": loss,
                  "time": time.time()}
        if self.sensor is not None:
            record["mu_hat"] = self.sensor.estimate
        record.update(momentum_trace(self.optimizer))
        if is_tuner(self.optimizer):
            record["lr"] = float(self.optimizer.stats(0)["alpha"])
        return record

    def report(self) -> dict:
        counts = dict(sorted(self.staleness_counts.items()))
        return {"version": self.version, "staleness_counts": counts, "mean_staleness": mean_staleness(counts),
                "rejected": len(self.rejected), "applied_per_worker": dict(self.applied_per_worker),
                "mu_hat": self.sensor.estimate if self.sensor is not None else None,
                "momentum_offset": self.controller.offset if self.controller is not None else None}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": self.version, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "sensor": self.sensor.state_dict() if self.sensor is not None else None,
                "staleness_counts": dict(self.staleness_counts)}

    def save_checkpoint(self, path: str | None = None) -> str:
        """Atomic: write a temporary file, fsync, rename over ``path`` (default ``checkpoint_path``)."""
        return save_checkpoint_file(self.state_dict(), path or self.checkpoint_path)

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restore a checkpoint (before or between runs); the workers then get the restored model.

        All or nothing: if any part does not fit this server, it raises and nothing has changed."""
        path = path or self.checkpoint_path
        state = load_checkpoint_file(path)
        try:
            version = int(state["version"])
            staleness_counts = collections.Counter({int(k): int(v) for k, v in state["staleness_counts"].items()})
            loads = [(self.model, state["model"]), (self.optimizer, state["optimizer"])]
            if self.controller is not None and state["controller"] is not None:
                loads.append((self.controller, state["controller"]))
            if self.sensor is not None and state["sensor"] is not None:
                loads.append((self.sensor, state["sensor"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path} is not a parameter server checkpoint: {error!r}") from error
        if version < 0:
            raise ValueError(f"{path}: version {version} is negative")
        load_all_or_nothing(loads)
        self.version = version
        self.staleness_counts = staleness_counts
        self._publish()
