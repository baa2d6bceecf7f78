"""Every asynchrony test must leave no worker process behind: checked after each test, and any leftover is
killed so that one failing test cannot leak processes into the rest of the run."""

import multiprocessing

import pytest


@pytest.fixture(autouse=True)
def no_leftover_worker_processes():
    yield
    leftovers = multiprocessing.active_children()  # also reaps children that already exited
    for process in leftovers:
        process.kill()
        process.join(10)
    if leftovers:
        pytest.fail(f"test left worker processes running: {[p.name for p in leftovers]}")
