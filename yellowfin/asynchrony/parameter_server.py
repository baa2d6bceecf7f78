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

import copy
import logging
import time
from multiprocessing.connection import wait
from typing import Callable, Iterator

import torch
from torch import nn

from .controller import ClosedLoopMomentum
from .flat import flat_parameters, load_parameters, loss_and_flat_gradient
from .sensor import MomentumSensor
from .server_core import ServerCore
from .workers import StopSignal, WorkerProcesses, prepare_worker

logger = logging.getLogger(__name__)

BatchFactory = Callable[[int, int], Iterator]  # (worker_id, seed) -> endless iterator of batches


# ----------------------------------------------------------------------------------------------
# Shared model (sequence lock): small and pure
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


# ----------------------------------------------------------------------------------------------
# Worker process
# ----------------------------------------------------------------------------------------------

def _worker_main(worker_id: int, model: nn.Module, loss_fn, batch_factory, seed: int,
                 shared_params: torch.Tensor, sequence: torch.Tensor, conn, stop: StopSignal) -> None:
    params, batches = prepare_worker(model, batch_factory, worker_id, seed)
    local = torch.empty_like(shared_params)
    try:
        while not stop.should_stop():
            version = read_published(shared_params, sequence, local, stop)
            if version is None:
                break
            load_parameters(params, local)
            grad, loss = loss_and_flat_gradient(loss_fn, model, params, next(batches))
            conn.send((worker_id, version, grad.numpy(), loss))
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

class ParameterServer(ServerCore, WorkerProcesses):
    """Applies workers' gradients in arrival order; records staleness; survives worker faults.

    The update path (validation, the optimizer step, staleness, sensor, controller, trace, checkpoints) is
    :class:`~yellowfin.asynchrony.server_core.ServerCore`'s; this class adds the local worker processes.

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
        WorkerProcesses.__init__(self, num_workers, seed, loss_fn, batch_factory, start_method, join_timeout,
                                 replace_dead_workers, max_restarts, restart_window)
        ServerCore.__init__(self, model, optimizer, self.num_workers, seed=seed, closed_loop=closed_loop,
                            controller=controller, sensor=sensor, sensor_step=sensor_step,
                            sensor_subset=sensor_subset, gain=gain, checkpoint_path=checkpoint_path,
                            checkpoint_every=checkpoint_every, trace_every=trace_every)
        self.replacements = 0

        self._shared_params = torch.zeros_like(flat_parameters(self.params)).share_memory_()
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

    def _share(self, flat: torch.Tensor) -> None:
        publish(self._shared_params, self._sequence, flat, self.version)

    def _worker_died(self, worker_id: int) -> None:
        conn = self._conns.pop(worker_id, None)
        if conn is not None:
            conn.close()
        if self._replace(self._reap(worker_id, self.version), stopping=self._stop.is_set()):
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
                raise self._every_worker_gone("every worker has died and none is being replaced")
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
        return {**super().report(), "worker_failures": list(self.worker_failures),
                "replacements": self.replacements}
