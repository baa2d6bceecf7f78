"""Fault injection: a server (or Hogwild tuner) runs in a forked child, in a process group of its own,
while a seeded thread inside it SIGKILLs random workers at random moments (also while they start). The test
then SIGKILLs the server itself at a seeded random moment (the first round during start-up) and checks that
- nothing of the group is left running, and
- nothing is lost: the last checkpoint written before the kill is consistent (its version equals the number
  of updates its optimizer applied), loads, and training continues from it.
Each round is bounded (waits with deadlines, pytest-timeout), and the whole group is killed in any case."""

import multiprocessing
import os
import random
import signal
import threading
import time

import pytest
import torch

from asynchrony_problems import make_regression_model, regression_batches, regression_loss
from yellowfin import YellowFin
from yellowfin.asynchrony import Hogwild, ParameterServer

pytestmark = pytest.mark.timeout(120)

ROUNDS = 3


def _run_system_under_fire(kind, seed, path, started):
    """The server's process (forked from the test, in a process group of its own): a system whose workers
    a seeded thread SIGKILLs at random moments, checkpointing as it goes, until the test kills it."""
    os.setpgrp()
    torch.set_num_threads(1)
    model = make_regression_model(0)
    if kind == "server":
        system = ParameterServer(model, YellowFin(model.parameters()), regression_loss, regression_batches,
                                 num_workers=3, closed_loop=True, checkpoint_path=path, checkpoint_every=15,
                                 max_restarts=10 ** 6)
    else:
        system = Hogwild(model, regression_loss, regression_batches, num_workers=3, closed_loop=True,
                         max_restarts=10 ** 6)
    chaos = random.Random(seed)

    def kill_random_workers():
        while True:
            time.sleep(chaos.uniform(0.0, 0.15))
            try:
                os.kill(system.worker_pid(chaos.randrange(3)), signal.SIGKILL)
            except (KeyError, ProcessLookupError):  # not started yet, or already dead
                pass

    threading.Thread(target=kill_random_workers, daemon=True).start()
    started.send(os.getpgrp())
    with system:
        if kind == "server":
            system.run(10 ** 9, timeout=120)  # checkpoints every 15 updates; killed long before the end
        else:
            while True:
                system.run(25, timeout=120)
                system.save_checkpoint(path)


def _group_members(group):
    """Pids of the processes in a process group that are still running (zombies have exited)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


def _kill_server_at_a_random_moment(kind, seed, path, delay):
    """Start the system, SIGKILL the server ``delay`` seconds after it starts; assert nothing is left."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    server = context.Process(target=_run_system_under_fire, args=(kind, seed, path, sender))
    server.start()
    sender.close()
    group = None
    try:
        assert receiver.poll(60), "the server did not start"
        group = receiver.recv()
        assert group == server.pid
        time.sleep(delay)
        assert server.is_alive(), f"the server died before it was killed (exit code {server.exitcode})"
        server.kill()
        server.join(30)
        deadline = time.monotonic() + 30  # a bound for the wait, not a timing assertion
        while _group_members(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_members(group) == [], "processes left running after the server was killed"
    finally:
        if group is not None:
            try:
                os.killpg(group, signal.SIGKILL)  # this test's own group: never leave anything behind
            except ProcessLookupError:
                pass
        if server.is_alive():
            server.kill()
        server.join(30)
        receiver.close()


def _delays(seed):
    rng = random.Random(seed)
    return [rng.uniform(0.0, 0.3)] + [rng.uniform(1.0, 3.0) for _ in range(ROUNDS - 1)]


def test_parameter_server_survives_random_kills_and_its_checkpoint_continues(tmp_path):
    for round_, delay in enumerate(_delays(seed=2024)):
        path = str(tmp_path / f"server{round_}.pt")
        _kill_server_at_a_random_moment("server", round_, path, delay)
        if not os.path.exists(path):  # killed before its first checkpoint
            continue
        model = make_regression_model(5)
        resumed = ParameterServer(model, YellowFin(model.parameters()), regression_loss, regression_batches,
                                  num_workers=2, closed_loop=True)
        resumed.load_checkpoint(path)
        saved = resumed.version
        assert saved > 0 and saved % 15 == 0
        # Nothing lost: every update counted in the version was applied by the optimizer, once.
        assert sum(resumed.staleness_counts.values()) == saved
        assert resumed.optimizer.stats()["step"] == saved == resumed.controller.calls
        with resumed:
            report = resumed.run(20, timeout=60)
        assert report["version"] == saved + 20 == resumed.optimizer.stats()["step"]
        assert all(torch.isfinite(p).all() for p in model.parameters())


# Parallel to the parameter server's test above on purpose: the same faults, the other system.
def test_hogwild_survives_random_kills_and_its_checkpoint_continues(tmp_path):
    for round_, delay in enumerate(_delays(seed=4202)):
        path = str(tmp_path / f"hogwild{round_}.pt")
        _kill_server_at_a_random_moment("hogwild", round_, path, delay)
        if not os.path.exists(path):
            continue
        resumed = Hogwild(make_regression_model(5), regression_loss, regression_batches, num_workers=2,
                          closed_loop=True)
        resumed.load_checkpoint(path)
        saved = resumed.version
        assert saved >= 25
        # The tuner's state is the one saved with this version: it tuned on at most one gradient per update (a
        # worker killed between its update and its mail loses one), and the controller on the same ones.
        assert resumed.tuner.stats()["step"] == resumed.controller.calls == resumed.tuned_gradients <= saved
        with resumed:
            report = resumed.run(25, timeout=60)
        assert report["version"] >= saved + 25
        assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
        assert all(torch.isfinite(b).all() for b in resumed.shared.buffers)
