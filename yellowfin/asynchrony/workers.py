"""What the parameter server and Hogwild! share about their worker processes: the context manager,
a fresh seed for each (re)start of a worker, and a stop that joins and then kills."""

from __future__ import annotations

import collections
import time

import torch.multiprocessing as mp


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
