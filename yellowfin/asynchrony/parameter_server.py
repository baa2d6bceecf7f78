"""A real asynchronous parameter server on one machine.

M worker processes each pull the latest published model version, compute a gradient on their own batch,
and push it back together with the version they pulled. The server applies gradients in arrival order with
any torch optimizer and republishes. Nothing waits for anybody: the staleness of a gradient is how many
updates other workers' gradients made between its pull and its arrival, and the server records it.

Plumbing, chosen so a worker killed at any moment cannot hurt the others:
- Pull: the server publishes the flat parameter vector into shared memory under a sequence lock (the
  single writer makes the counter odd while copying). Workers retry a read that overlapped a write, so
  they never see a torn model, and hold no lock a dying worker could leave locked.
- Push: each worker has its own pipe to the server and waits for the server's acknowledgement before
  pulling again (one gradient in flight per worker, like a synchronous push RPC; otherwise gradients
  queue up in the pipe and staleness measures queue depth, not asynchrony). A worker dying
  mid-message only breaks its own pipe (the server gets EOF); a shared queue would leave a
  half-written message and a held lock for everyone.
- The server waits on all pipes and on every worker's process sentinel, so it notices a death at once.

    server = ParameterServer(model, YellowFin(model.parameters()), task.loss,
                             BatchFactory(...), num_workers=4, closed_loop=True)
    with server:
        report = server.run(num_updates=2000)
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import time
from multiprocessing.connection import wait
from typing import Callable, Iterator

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from .controller import ClosedLoopMomentum, closed_loop_for
from .sensor import MomentumSensor, flat_gradients, flat_parameters
from .workers import StopSignal, WorkerProcesses, load_all_or_nothing, load_checkpoint_file
from .simulator import step_size_of

logger = logging.getLogger(__name__)

BatchFactory = Callable[[int, int], Iterator]  # (worker_id, seed) -> endless iterator of batches


# ----------------------------------------------------------------------------------------------
# Shared model (sequence lock) and gradient validation: small and pure
# ----------------------------------------------------------------------------------------------

def publish(shared_params: torch.Tensor, sequence: torch.Tensor, flat: torch.Tensor,
            version: int) -> None:
    """Single writer: odd sequence while copying, then 2 * version."""
    sequence[0] = 2 * version + 1
    shared_params.copy_(flat)
    sequence[0] = 2 * version


def read_published(shared_params: torch.Tensor, sequence: torch.Tensor, out: torch.Tensor,
                   stop: StopSignal | None = None) -> int | None:
    """Copy a consistent snapshot into ``out``; return its version (None if asked to stop)."""
    while stop is None or not stop.should_stop():
        before = int(sequence[0])
        if before % 2:
            time.sleep(0)
            continue
        out.copy_(shared_params)
        if int(sequence[0]) == before:
            return before // 2
    return None


def gradient_problem(grad, numel: int, dtype: np.dtype) -> str | None:
    """Why a pushed gradient must be rejected, or None if it is fine."""
    if not isinstance(grad, np.ndarray):
        return f"gradient is a {type(grad).__name__}, expected a numpy array"
    if grad.dtype != dtype:
        return f"gradient dtype {grad.dtype} != model dtype {dtype}"
    if grad.shape != (numel,):
        return f"gradient shape {grad.shape} != ({numel},)"
    if not np.isfinite(grad).all():
        return "gradient contains NaN or Inf"
    return None


def atomic_save(state: dict, path: str) -> None:
    """Write to a temporary file in the same directory, flush it to disk, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Worker process
# ----------------------------------------------------------------------------------------------

def _worker_main(worker_id: int, model: nn.Module, loss_fn, batch_factory, seed: int,
                 shared_params: torch.Tensor, sequence: torch.Tensor, conn, stop: StopSignal) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = batch_factory(worker_id, seed)
    local = torch.empty_like(shared_params)
    try:
        while not stop.should_stop():
            version = read_published(shared_params, sequence, local, stop)
            if version is None:
                break
            offset = 0
            with torch.no_grad():
                for p in params:
                    n = p.numel()
                    p.copy_(local[offset:offset + n].view_as(p))
                    offset += n
                    p.grad = None
            loss = loss_fn(model, next(batches))
            loss.backward()
            grad = flat_gradients(params).numpy()
            conn.send((worker_id, version, grad, float(loss.detach())))
            # Wait for the server to take it: at most one gradient in flight per worker. Poll, and check
            # the parent between polls: cheap insurance should a dead server's EOF not arrive.
            while not conn.poll(0.2):
                if stop.should_stop():
                    return
            conn.recv()
    except (BrokenPipeError, EOFError, ConnectionResetError, KeyboardInterrupt):
        pass  # the server went away or asked us to stop
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------

class ParameterServer(WorkerProcesses):
    """Applies workers' gradients in arrival order; records staleness; survives worker faults.

    Arguments:
        model, optimizer: the server's model and any torch optimizer over its parameters.
        loss_fn(model, batch) -> scalar loss; batch_factory(worker_id, seed) -> endless batch iterator.
            Both run in the workers (with the default ``fork`` start method they may be closures;
            with ``spawn`` they must be picklable).
        closed_loop: attach a momentum sensor and a :class:`ClosedLoopMomentum` controller (YellowFin).
        sensor_step: "algorithmic" (alpha) or "effective" (alpha / M) for the controller's sensor.
        checkpoint_path / checkpoint_every: atomic checkpoints of model, optimizer, controller.
        replace_dead_workers: start a replacement when a worker dies, at most ``max_restarts`` times per
            worker within ``restart_window`` seconds; one more death stops the run and raises
            :class:`~yellowfin.asynchrony.workers.WorkerFailed` with the worker's exception and traceback.
    """

    def __init__(self, model: nn.Module, optimizer, loss_fn, batch_factory: BatchFactory,
                 num_workers: int = 4, seed: int = 0, closed_loop: bool = False,
                 controller: ClosedLoopMomentum | None = None, sensor: MomentumSensor | None = None,
                 sensor_step: str = "algorithmic", sensor_subset: int = 512, gain: float = 0.01,
                 checkpoint_path: str | None = None, checkpoint_every: int = 0,
                 replace_dead_workers: bool = True, start_method: str = "fork",
                 join_timeout: float = 5.0, trace_every: int = 1, max_restarts: int = 3,
                 restart_window: float = 60.0):
        super().__init__(int(num_workers), seed, join_timeout, max_restarts, restart_window)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.batch_factory = batch_factory
        self.params = [p for p in model.parameters() if p.requires_grad]
        flat = flat_parameters(self.params)
        self.numel = flat.numel()
        self.dtype = flat.numpy().dtype
        if closed_loop and controller is None:
            controller = closed_loop_for(optimizer, self.numel, self.num_workers, sensor_step, gain,
                                         sensor_subset, seed=seed, history=16 * self.num_workers + 8)
        if controller is not None and sensor is None:
            sensor = controller.sensor
        self.sensor = sensor
        self.controller = controller
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = int(checkpoint_every)
        self.replace_dead_workers = replace_dead_workers
        self.trace_every = max(1, int(trace_every))
        self._ctx = mp.get_context(start_method)

        self.version = 0
        self.staleness_counts: collections.Counter[int] = collections.Counter()
        self.rejected: list[tuple[int, str]] = []
        self.worker_failures: list[dict] = []
        self.replacements = 0
        self.trace: list[dict] = []
        self.applied_per_worker: collections.Counter[int] = collections.Counter()

        self._shared_params = torch.zeros(self.numel, dtype=flat.dtype).share_memory_()
        self._sequence = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._stop = None
        self._conns: dict[int, object] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._workers:
            return
        self._stop = StopSignal()
        self._publish()
        for worker_id in range(self.num_workers):
            self._start_worker(worker_id)

    def _start_worker(self, worker_id: int) -> None:
        receiver, sender = self._ctx.Pipe(duplex=True)
        seed = self._next_seed(worker_id)
        self._launch(worker_id, f"yellowfin-ps-worker-{worker_id}", _worker_main,
                     (worker_id, copy.deepcopy(self.model), self.loss_fn, self.batch_factory, seed,
                      self._shared_params, self._sequence, sender, self._stop), own_ends=(receiver,))
        sender.close()  # only the worker holds its end, so its death gives us EOF
        self._conns[worker_id] = receiver

    def _parent_pipe_ends(self) -> list:
        return [*super()._parent_pipe_ends(), *self._conns.values()]

    def stop(self) -> None:
        """Stop every worker: ask, then close the pipes (unblocks senders), join, then kill."""
        if self._stop is not None:
            self._stop.set()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        self._join_workers()

    def kill_worker(self, worker_id: int) -> None:
        """Fault injection: SIGKILL one worker (the server finds out on its own)."""
        self._workers[worker_id].kill()

    # -- the update path ------------------------------------------------------------------
    def _publish(self) -> None:
        publish(self._shared_params, self._sequence, flat_parameters(self.params), self.version)
        if self.sensor is not None:
            self.sensor.record_iterate(self.version, self._shared_params)

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
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat_grad[offset:offset + n].view_as(p).clone()
            offset += n
        staleness = self.version - pulled_version
        self.optimizer.step()
        if self.sensor is not None:
            self.sensor.record_step(self.version, step_size_of(self.optimizer))
        self.version += 1
        self._publish()
        self.staleness_counts[staleness] += 1
        self.applied_per_worker[worker_id] += 1
        if self.sensor is not None:
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
        if hasattr(self.optimizer, "stats") and hasattr(self.optimizer, "set_momentum_offset"):
            stats = self.optimizer.stats()
            stats = stats[0] if isinstance(stats, list) else stats
            record["mu_target"] = float(stats["mu"])
            record["mu_applied"] = float(stats.get("applied_momentum", stats["mu"]))
            record["lr"] = float(stats["lr"])
        return record

    def _worker_died(self, worker_id: int) -> None:
        conn = self._conns.pop(worker_id, None)
        if conn is not None:
            conn.close()
        failure = self._reap(worker_id, self.version)
        self.worker_failures.append(failure)
        if self.replace_dead_workers and not self._stop.is_set():
            self._check_restart_budget(failure)
            self._start_worker(worker_id)
            self.replacements += 1

    def run(self, num_updates: int, timeout: float | None = None) -> dict:
        """Apply ``num_updates`` more gradients (arrival order); returns :meth:`report`.

        Raises TimeoutError past ``timeout`` seconds, WorkerFailed when a worker dies more often than
        its restart budget allows, and RuntimeError if every worker is gone.
        """
        self.start()
        target = self.version + int(num_updates)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.version < target:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"parameter server reached version {self.version} of {target}")
            if not self._workers:
                errors = [f["error"] for f in self.worker_failures if f["error"]]
                raise RuntimeError("every worker has died and none is being replaced"
                                   + (f"; the last error:\n{errors[-1]}" if errors else ""))
            by_handle = {}
            for worker_id, conn in self._conns.items():
                by_handle[conn] = ("message", worker_id)
            for worker_id, process in self._workers.items():
                by_handle[process.sentinel] = ("exit", worker_id)
            ready = wait(list(by_handle), timeout=0.5)
            dead = set()
            for handle in ready:
                kind, worker_id = by_handle[handle]
                if worker_id in dead or self.version >= target:
                    continue
                if kind == "message":
                    try:
                        message = handle.recv()
                    except (EOFError, OSError):
                        dead.add(worker_id)
                        continue
                    except Exception as error:  # an unreadable message: reject, keep the worker
                        logger.error("rejected unreadable message from worker %d: %r", worker_id, error)
                        self.rejected.append((worker_id, f"unreadable message: {error!r}"))
                        message = None
                    if message is not None:
                        self._handle_message(worker_id, message)
                    if not self._acknowledge(worker_id):
                        dead.add(worker_id)
                elif not self._workers[worker_id].is_alive():
                    # Messages it sent before dying are still in its pipe: drain them first.
                    conn = self._conns.get(worker_id)
                    while conn is not None and self.version < target:
                        try:
                            if not conn.poll():
                                break
                            self._handle_message(worker_id, conn.recv())
                        except (EOFError, OSError):
                            break
                        except Exception as error:
                            self.rejected.append((worker_id, f"unreadable message: {error!r}"))
                            break
                    dead.add(worker_id)
            for worker_id in dead:
                self._worker_died(worker_id)
        return self.report()

    def _acknowledge(self, worker_id: int) -> bool:
        try:
            self._conns[worker_id].send(self.version)
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            return False

    def _handle_message(self, worker_id: int, message) -> None:
        try:
            sender_id, version, grad, loss = message
        except (TypeError, ValueError):
            logger.error("rejected malformed message from worker %d", worker_id)
            self.rejected.append((worker_id, "malformed message"))
            return
        self.apply_gradient(worker_id, version, grad, loss)

    def report(self) -> dict:
        counts = dict(sorted(self.staleness_counts.items()))
        total = sum(counts.values())
        mean = sum(k * v for k, v in counts.items()) / total if total else float("nan")
        return {"version": self.version, "staleness_counts": counts, "mean_staleness": mean,
                "rejected": len(self.rejected), "worker_failures": list(self.worker_failures),
                "replacements": self.replacements, "applied_per_worker": dict(self.applied_per_worker),
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
        path = path or self.checkpoint_path
        atomic_save(self.state_dict(), path)
        return path

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restore a checkpoint (before or between runs); the workers then pull the restored model.

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
