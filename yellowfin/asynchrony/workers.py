"""What the parameter server and Hogwild! share about their worker processes: the context manager,
a fresh seed for each (re)start of a worker, the stop signal, the launch of a worker process, and a stop
that joins and then kills."""

from __future__ import annotations

import collections
import copy
import os
import time

import torch
import torch.multiprocessing as mp


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


def load_checkpoint_file(path: str) -> dict:
    """``torch.load`` that can only rebuild tensors and plain containers: a checkpoint file can never run
    code (with ``weights_only=False`` unpickling a crafted file runs whatever it names)."""
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint (a dict)")
    return state


def load_all_or_nothing(loads: list[tuple[object, dict]]) -> None:
    """``component.load_state_dict(state)`` for each pair; if any of them raises, every component gets its
    previous state back before the error propagates, so a checkpoint that fails to load changes nothing
    (``load_state_dict`` methods check as they go and may have applied part of the state already)."""
    previous = [(component, copy.deepcopy(component.state_dict())) for component, _ in loads]
    try:
        for component, state in loads:
            component.load_state_dict(state)
    except BaseException:
        for component, state in previous:
            component.load_state_dict(state)
        raise


def _worker_entry(target, args, inherited) -> None:
    """Runs first in every worker. A forked child holds copies of every pipe end the parent held; close
    the parent's ends, so that when the parent dies nobody holds them and a send fails instead of
    blocking forever on a full pipe."""
    for connection in inherited:
        connection.close()
    target(*args)


class WorkerProcesses:
    """Base of a system of ``num_workers`` processes. Subclasses define ``start`` (set up what the
    workers share, start each) and ``stop`` (tell the workers, then ``_join_workers``)."""

    def __init__(self, num_workers: int, seed: int, join_timeout: float):
        self.num_workers = num_workers
        self.seed = int(seed)
        self.join_timeout = float(join_timeout)
        self._workers: dict[int, mp.Process] = {}
        self._generation: collections.Counter[int] = collections.Counter()

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
        """Pipe ends this (parent) process holds; subclasses with pipes list theirs."""
        return []

    def _launch(self, worker_id: int, name: str, target, args: tuple, own_ends: tuple = ()):
        """Start ``target(*args)`` in a new worker process; ``own_ends`` are parent-side ends of the
        new worker's own pipes, which the child must not keep either."""
        inherited = []
        if self._ctx.get_start_method() == "fork":  # spawn and forkserver children inherit nothing
            inherited = [*self._parent_pipe_ends(), *own_ends]
        process = self._ctx.Process(target=_worker_entry, name=name, daemon=True,
                                    args=(target, args, inherited))
        process.start()
        self._workers[worker_id] = process
        return process

    def _next_seed(self, worker_id: int) -> int:
        """A different seed at each (re)start, so a replacement does not replay its predecessor's batches."""
        generation = self._generation[worker_id]
        self._generation[worker_id] += 1
        return self.seed * 1_000_003 + worker_id * 1009 + generation

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
