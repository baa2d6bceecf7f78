"""Asynchronous training across machines on Ray: the parameter server and its workers as Ray actors.

The server actor holds a :class:`yellowfin.asynchrony.ServerCore`, the update path the local
``ParameterServer`` uses too (validation, the optimizer step, the momentum sensor, the closed-loop
controller, atomic checkpoints), so closed-loop YellowFin behaves here exactly as on one machine. Ray runs one call at a time on an actor, so gradients
are applied in arrival order. Each worker actor loops: push its gradient, get the new model back in the
reply (one round trip per update), compute the next gradient on it. Workers run with ``max_restarts``
and ``max_task_retries``: one that dies is restarted by Ray and picks up the loop, while the server goes
on with the others.

    with RayAsyncTrainer(model, loss_fn, batch_factory, num_workers=4, closed_loop=True,
                         checkpoint_path="/shared/ps.pt", checkpoint_every=500) as trainer:
        report = trainer.run(num_updates=10_000)
        model.load_state_dict(trainer.model_state_dict())

``RayAsyncTrainer(address="auto")`` (or ``"ray://head:10001"``) joins a running cluster; without an
address it starts Ray on this machine. ``loss_fn`` and ``batch_factory`` run in the workers: Ray pickles
them by value when they are defined in the script, by reference when they live in an importable module.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Callable

import numpy as np
import ray
import torch
from torch import nn

from ..asynchrony.flat import flat_parameters, load_parameters, loss_and_flat_gradient
from ..asynchrony.server_core import ServerCore
from ..asynchrony.workers import prepare_worker, worker_seed
from ..optimizer import YellowFin

logger = logging.getLogger(__name__)


class ParameterServerActor:
    """The server side. ``push`` applies a gradient and answers with the model to compute on next, or
    None once the current run's target version is reached (the worker then stops)."""

    def __init__(self, model: nn.Module, optimizer_fn: Callable, num_workers: int, seed: int,
                 closed_loop: bool, sensor_step: str, gain: float, checkpoint_path: str | None,
                 checkpoint_every: int, resume: bool):
        torch.set_num_threads(1)
        optimizer = optimizer_fn([p for p in model.parameters() if p.requires_grad])
        self.core = ServerCore(model, optimizer, num_workers, seed=seed, closed_loop=closed_loop,
                               sensor_step=sensor_step, gain=gain, checkpoint_path=checkpoint_path,
                               checkpoint_every=checkpoint_every)
        self.resumed_from = None
        if resume and checkpoint_path and os.path.exists(checkpoint_path):
            self.core.load_checkpoint(checkpoint_path)
            self.resumed_from = self.core.version
        self.target = self.core.version  # nothing to do until a run sets a target
        self.registrations: list[dict] = []

    def register(self, worker_id: int, pid: int, node: str) -> int:
        """A worker (re)started; returns its incarnation number (0 for the first start)."""
        incarnation = sum(r["worker"] == worker_id for r in self.registrations)
        self.registrations.append({"worker": worker_id, "pid": pid, "node": node,
                                   "incarnation": incarnation, "version": self.core.version})
        return incarnation

    def set_target(self, num_updates: int) -> int:
        self.target = self.core.version + int(num_updates)
        return self.target

    def stop(self) -> int:
        self.target = self.core.version
        return self.target

    def pull(self):
        if self.core.version >= self.target:
            return None
        return self.core.version, flat_parameters(self.core.params).numpy()

    def push(self, worker_id: int, pulled_version: int, grad: np.ndarray, loss: float):
        if self.core.version >= self.target:
            return None  # the run is over; this gradient is not applied
        if isinstance(grad, np.ndarray) and not grad.flags.writeable:
            grad = grad.copy()  # Ray hands out read-only buffers; torch wants to own writable ones
        self.core.apply_gradient(worker_id, pulled_version, grad, loss)
        return self.pull()

    def status(self) -> dict:
        return {"version": self.core.version, "target": self.target}

    def report(self) -> dict:
        report = self.core.report()
        report["registrations"] = list(self.registrations)
        report["restarts"] = dict(collections.Counter(
            r["worker"] for r in self.registrations if r["incarnation"] > 0))
        report["resumed_from"] = self.resumed_from
        stats = getattr(self.core.optimizer, "stats", None)
        report["optimizer"] = stats() if callable(stats) else None
        return report

    def trace(self) -> list[dict]:
        return list(self.core.trace)

    def model_state_dict(self) -> dict:
        return {name: value.clone() for name, value in self.core.model.state_dict().items()}

    def save_checkpoint(self, path: str | None = None) -> str:
        return self.core.save_checkpoint(path)


class GradientWorker:
    """Computes gradients on the model the server last sent, forever (until the server says stop)."""

    def __init__(self, worker_id: int, server, model: nn.Module, loss_fn, batch_factory, seed: int):
        self.worker_id = worker_id
        self.server = server
        self.model = model
        self.loss_fn = loss_fn
        incarnation = ray.get(server.register.remote(worker_id, os.getpid(), ray.util.get_node_ip_address()))
        # A restarted worker draws fresh batches rather than repeating its predecessor's.
        self.params, self.batches = prepare_worker(model, batch_factory, worker_id,
                                                   worker_seed(seed, worker_id, incarnation))

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> int:
        """Push gradients until the server's target is reached; returns how many this call pushed."""
        pushed = 0
        reply = ray.get(self.server.pull.remote())
        while reply is not None:
            version, flat = reply
            load_parameters(self.params, torch.from_numpy(flat))
            grad, loss = loss_and_flat_gradient(self.loss_fn, self.model, self.params, next(self.batches))
            reply = ray.get(self.server.push.remote(self.worker_id, version, grad.numpy(), loss))
            pushed += 1
        return pushed


# Ray lowers its workers' priority to niceness 15 by default; here they are the training itself.
RUN_WORKERS_AT_NORMAL_PRIORITY = {"worker_niceness": 0}


class RayAsyncTrainer:
    """A parameter server and ``num_workers`` gradient workers on Ray; see the module docstring.

    Arguments:
        model: the model (the server holds the master copy; each worker gets its own copy).
        loss_fn(model, batch) -> scalar loss, and batch_factory(worker_id, seed) -> endless iterator of
            batches: both run in the workers.
        optimizer_fn(params) -> optimizer at the server (YellowFin by default).
        closed_loop, sensor_step, gain: closed-loop momentum control at the server (yellowfin.asynchrony).
        checkpoint_path, checkpoint_every: atomic checkpoints (write, fsync, rename) every so many updates;
            with ``resume=True`` the server starts from the checkpoint if the file exists.
        max_restarts: how often Ray restarts a dead worker (-1: without limit).
        address: None starts Ray here; "auto" or "ray://host:port" joins a cluster. Ignored when Ray is
            already initialised. ``init_options`` go to ``ray.init``. A Ray started here runs its workers
            at normal priority (``RUN_WORKERS_AT_NORMAL_PRIORITY``): Ray's own default renices them to 15,
            which on a busy machine starves the processes that do the training (the server took two
            minutes to start beside two other jobs on two cores); a ``_system_config`` in
            ``init_options`` replaces this.
        worker_num_cpus: CPUs Ray reserves per worker (the server reserves none: it mostly waits).
        server_options: Ray actor options for the server, e.g. a ``scheduling_strategy`` that pins it to
            the node whose disk holds ``checkpoint_path``.
    """

    def __init__(self, model: nn.Module, loss_fn, batch_factory, num_workers: int = 2,
                 optimizer_fn: Callable = YellowFin, closed_loop: bool = True, sensor_step: str = "algorithmic",
                 gain: float = 0.01, checkpoint_path: str | None = None, checkpoint_every: int = 0,
                 resume: bool = False, max_restarts: int = 3, seed: int = 0, address: str | None = None,
                 init_options: dict | None = None, worker_num_cpus: float = 1.0,
                 server_options: dict | None = None):
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if checkpoint_every and not checkpoint_path:
            raise ValueError("checkpoint_every needs a checkpoint_path")
        if checkpoint_path:
            checkpoint_path = os.path.abspath(checkpoint_path)  # the server's working directory is Ray's
        self._owns_ray = False
        if not ray.is_initialized():
            options = dict(init_options or {})
            if address is None:  # (a cluster that is joined keeps its own configuration)
                options.setdefault("_system_config", RUN_WORKERS_AT_NORMAL_PRIORITY)
            ray.init(address=address, **options)
            self._owns_ray = True
        self.num_workers = int(num_workers)
        # One copy in the object store for every actor. A restarted actor re-reads its constructor
        # arguments from there, so the trainer holds the reference for as long as it lives.
        self._model_ref = ray.put(model)
        self.server = ray.remote(num_cpus=0, max_restarts=0)(ParameterServerActor).options(
            **(server_options or {})).remote(
            self._model_ref, optimizer_fn, self.num_workers, seed, closed_loop, sensor_step, gain,
            checkpoint_path, checkpoint_every, resume)
        worker_class = ray.remote(num_cpus=worker_num_cpus, max_restarts=max_restarts,
                                  max_task_retries=-1)(GradientWorker)
        self.workers = [worker_class.remote(i, self.server, self._model_ref, loss_fn, batch_factory, seed)
                        for i in range(self.num_workers)]
        self.lost_workers: list[int] = []
        self._workers_started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def run(self, num_updates: int, timeout: float | None = None) -> dict:
        """Apply ``num_updates`` more gradients; returns the server's report.

        A worker Ray cannot restart any more is recorded in ``lost_workers``; the others carry on.
        Raises TimeoutError past ``timeout`` seconds (after stopping the workers) and RuntimeError when
        every worker is lost before the target.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:  # (the first call also waits for the server actor to start: within the same timeout)
            target = ray.get(self.server.set_target.remote(num_updates), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"Ray parameter server did not answer within {timeout}s") from None
        live = [(worker_id, worker) for worker_id, worker in enumerate(self.workers)
                if worker_id not in self.lost_workers]
        if not self._workers_started:
            # The first call waits (within the same timeout) until every worker process is up, so that all take part
            # from the first update: one that is still starting would otherwise join only after a short run ended
            # (a worker that failed to start is reported by the loop below).
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            started = [worker.pid.remote() for _, worker in live]
            ray.wait(started, num_returns=len(started), timeout=wait_s)
            self._workers_started = True
        runs = {worker.run.remote(): worker_id for worker_id, worker in live}
        pending = list(runs)
        while pending:
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not done:
                ray.get(self.server.stop.remote())
                ray.wait(pending, num_returns=len(pending), timeout=30)
                version = ray.get(self.server.status.remote())["version"]
                raise TimeoutError(f"Ray parameter server reached version {version} of {target} "
                                   f"in {timeout}s")
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    logger.warning("worker %d is gone for good: %s", runs[ref], error)
                    self.lost_workers.append(runs[ref])
                except Exception:  # the user's loss or batches raised: stop the others too
                    ray.get(self.server.stop.remote())
                    raise
        status = ray.get(self.server.status.remote())
        if status["version"] < status["target"]:  # (a stop() lowers the target to the version reached)
            raise RuntimeError(f"every worker is lost; the server stopped at version {status['version']} "
                               f"of {target}")
        return self.report()

    def stop(self) -> None:
        """End the current run early (from another thread): ``run`` returns at the version reached."""
        ray.get(self.server.stop.remote())

    def status(self) -> dict:
        """The server's version and the current run's target."""
        return ray.get(self.server.status.remote())

    def report(self) -> dict:
        report = ray.get(self.server.report.remote())
        report["lost_workers"] = list(self.lost_workers)
        return report

    def trace(self) -> list[dict]:
        return ray.get(self.server.trace.remote())

    def worker_pids(self) -> dict[int, int]:
        """The process id of each worker's current incarnation (from its registration)."""
        pids = {}
        for registration in ray.get(self.server.report.remote())["registrations"]:
            pids[registration["worker"]] = registration["pid"]
        return pids

    def model_state_dict(self) -> dict:
        return ray.get(self.server.model_state_dict.remote())

    def save_checkpoint(self, path: str | None = None) -> str:
        return ray.get(self.server.save_checkpoint.remote(path))

    def shutdown(self) -> None:
        """Kill the actors (no restarts), and stop Ray if this trainer started it."""
        for actor in [*self.workers, self.server]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.workers = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
