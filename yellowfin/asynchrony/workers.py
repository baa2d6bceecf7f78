"""What the parameter server and Hogwild! share about their worker processes: the context manager,
a fresh seed for each (re)start of a worker (the Ray workers' too), the stop signal, the launch of a
worker process, and a stop that joins and then kills."""

from __future__ import annotations

import collections
import logging
import os
import time
import traceback

import torch
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)

# A worker's error report is written once, just before it exits; keeping it well under a pipe's buffer
# (64 KiB on Linux, and a character takes up to 4 bytes) means that write never waits for the parent.
MAX_ERROR_CHARS = 8_000


class WorkerFailed(RuntimeError):
    """A worker died more often than its restart budget allows; carries the worker's last error (the
    original exception and its traceback, as text) when it died of one."""

    def __init__(self, message: str, worker_id: int, error: str | None):
        super().__init__(message)
        self.worker_id = worker_id
        self.error = error


class StopSignal:
    """Tells workers to stop: a flag in shared memory, read and written without a lock (a worker killed
    at any moment cannot leave a lock held that the others, or the server's ``stop``, would wait on).

    It is made in the process that forks the workers, and remembers that process's pid: a worker compares
    ``os.getppid()`` with it, so a worker whose parent died even before the worker ran any code of its own
    (when ``os.getppid()`` would already name init) still finds out."""

    def __init__(self):
        self._flag = torch.zeros(1, dtype=torch.int8).share_memory_()
        self.parent_pid = os.getpid()

    def set(self) -> None:
        self._flag[0] = 1

    def is_set(self) -> bool:
        return bool(self._flag[0])

    def should_stop(self) -> bool:
        """In a worker: asked to stop, or orphaned (its parent is gone, and it was re-parented)."""
        return self.is_set() or os.getppid() != self.parent_pid


def worker_seed(seed: int, worker_id: int, incarnation: int) -> int:
    """The seed of a worker's ``incarnation``-th start (0 for the first): distinct for every worker and
    every restart, so a replacement does not replay its predecessor's batches. The local systems and the
    Ray workers use it alike."""
    return seed * 1_000_003 + worker_id * 1009 + incarnation


def prepare_worker(model, batch_factory, worker_id: int, seed: int) -> tuple[list, object]:
    """What every worker process does first: one torch thread (the workers share the cores), the
    worker's seed; returns the trainable parameters and the worker's batch iterator."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    return [p for p in model.parameters() if p.requires_grad], batch_factory(worker_id, seed)


def _worker_entry(target, args, error_pipe, inherited) -> None:
    """Runs first in every worker. A forked child holds copies of every pipe end the parent held; close
    the parent's ends, so that when the parent dies nobody holds them and a send fails instead of
    blocking forever on a full pipe. An exception in the worker (the user's loss, its batches) goes back
    to the parent as text, with its traceback, before the worker exits."""
    for connection in inherited:
        connection.close()
    try:
        target(*args)
    except Exception:
        try:
            error_pipe.send(traceback.format_exc()[-MAX_ERROR_CHARS:])
        except OSError:
            pass  # the parent is gone
        raise SystemExit(1)
    finally:
        error_pipe.close()


class WorkerProcesses:
    """Base of a system of ``num_workers`` processes that run ``loss_fn`` on ``batch_factory``'s batches.
    Subclasses define ``start`` (set up what the workers share, ``_launch`` each through
    ``_start_worker``) and ``stop`` (tell the workers, then ``_join_workers``); when a worker dies they
    ``_reap`` it and call ``_replace``."""

    def __init__(self, num_workers: int, seed: int, loss_fn, batch_factory, start_method: str,
                 join_timeout: float, replace_dead_workers: bool, max_restarts: int = 3,
                 restart_window: float = 60.0):
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if not restart_window > 0:
            raise ValueError(f"restart_window must be a number of seconds > 0, got {restart_window!r}")
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.loss_fn = loss_fn
        self.batch_factory = batch_factory
        self.replace_dead_workers = replace_dead_workers
        self._ctx = mp.get_context(start_method)
        self.join_timeout = float(join_timeout)
        self.max_restarts = max_restarts
        self.restart_window = float(restart_window)
        self._workers: dict[int, mp.Process] = {}
        self._error_pipes: dict[int, object] = {}
        self._restart_times: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._generation: collections.Counter[int] = collections.Counter()
        self.worker_failures: list[dict] = []

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def alive_workers(self) -> list[int]:
        return [i for i, p in self._workers.items() if p.is_alive()]

    def worker_pid(self, worker_id: int) -> int:
        return self._workers[worker_id].pid

    def _parent_pipe_ends(self) -> list:
        """Pipe ends this (parent) process holds; subclasses with pipes of their own add theirs."""
        return list(self._error_pipes.values())

    def _launch(self, worker_id: int, name: str, target, args: tuple, own_ends: tuple = ()):
        """Start ``target(*args)`` in a new worker process; ``own_ends`` are parent-side ends of the
        new worker's own pipes, which the child must not keep either."""
        error_reader, error_writer = self._ctx.Pipe(duplex=False)
        inherited = []
        if self._ctx.get_start_method() == "fork":  # spawn and forkserver children inherit nothing
            inherited = [*self._parent_pipe_ends(), *own_ends, error_reader]
        process = self._ctx.Process(target=_worker_entry, name=name, daemon=True,
                                    args=(target, args, error_writer, inherited))
        process.start()
        error_writer.close()
        self._workers[worker_id] = process
        self._error_pipes[worker_id] = error_reader
        return process

    def _reap(self, worker_id: int, version: int) -> dict:
        """Join a worker that has exited; record in ``worker_failures``, log and return what is known of
        its death."""
        process = self._workers.pop(worker_id)
        process.join(self.join_timeout)
        error = None
        reader = self._error_pipes.pop(worker_id, None)
        if reader is not None:
            try:
                if reader.poll():
                    error = str(reader.recv())
            except (EOFError, OSError):
                pass
            reader.close()
        failure = {"worker": worker_id, "pid": process.pid, "exitcode": process.exitcode,
                   "version": version, "error": error}
        logger.warning("worker %d (pid %s) died with exit code %s at version %d%s", worker_id, process.pid,
                       process.exitcode, version, f":\n{error}" if error else "")
        self.worker_failures.append(failure)
        return failure

    def _replace(self, failure: dict, stopping: bool) -> bool:
        """Start a replacement for the worker that ``failure`` reports, if replacing is on and the
        system is not stopping, within the restart budget (past it this raises WorkerFailed)."""
        if not self.replace_dead_workers or stopping:
            return False
        self._check_restart_budget(failure)
        self._start_worker(failure["worker"])
        return True

    def _every_worker_gone(self, message: str) -> RuntimeError:
        """The error for a run whose workers are all dead, with the last worker error when there is one."""
        errors = [f["error"] for f in self.worker_failures if f["error"]]
        return RuntimeError(message + (f"; the last error:\n{errors[-1]}" if errors else ""))

    def _check_restart_budget(self, failure: dict) -> None:
        """Allow at most ``max_restarts`` restarts of one worker within ``restart_window`` seconds;
        past that, stop every worker and raise :class:`WorkerFailed` with the worker's error."""
        worker_id = failure["worker"]
        now = time.monotonic()
        recent = self._restart_times[worker_id]
        while recent and recent[0] < now - self.restart_window:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            self.stop()
            cause = failure["error"] or f"exit code {failure['exitcode']}\n"
            raise WorkerFailed(
                f"worker {worker_id} died {len(recent) + 1} times within {self.restart_window:g} s, more than "
                f"max_restarts={self.max_restarts} allows; the run is stopped. Its last death:\n{cause}",
                worker_id, failure["error"])
        recent.append(now)

    def _next_seed(self, worker_id: int) -> int:
        """A different seed at each (re)start, so a replacement does not replay its predecessor's batches."""
        generation = self._generation[worker_id]
        self._generation[worker_id] += 1
        return worker_seed(self.seed, worker_id, generation)

    def _join_workers(self) -> None:
        """Join every worker within join_timeout in all, then kill what is left."""
        deadline = time.monotonic() + self.join_timeout
        for process in self._workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._workers.values():
            if process.is_alive():
                process.kill()
                process.join(self.join_timeout)
        self._workers.clear()
        for reader in self._error_pipes.values():
            reader.close()
        self._error_pipes.clear()
