"""Workers must not outlive a server (or Hogwild tuner) that was SIGKILLed: they notice their parent is gone
and exit. The server runs in a child interpreter that the test kills; every process is bounded in time.

Two ways a worker used to miss its parent's death, each with its own scenario:
- delayed_start: the parent dies before the child has run any of its own code (an at-fork hook sleeps 1 s
  in every child), so a child that asked os.getppid() for its parent only then learned init's pid;
- large_gradient: a gradient larger than a pipe's buffer, sent while the server dies, blocked forever
  when other workers held (inherited) copies of the server's receiving end of that pipe."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(120)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

SCRIPT = """
import os, sys, time, torch
torch.set_num_threads(1)
from asynchrony_problems import (make_regression_model, make_wide_model, regression_batches, regression_loss,
                                 wide_batches)
from yellowfin.asynchrony import Hogwild, ParameterServer
system_kind, scenario = sys.argv[1], sys.argv[2]
if scenario == "delayed_start":
    os.register_at_fork(after_in_child=lambda: time.sleep(1.0))
    model, batches = make_regression_model(0), regression_batches
else:
    model, batches = make_wide_model(0), wide_batches
if system_kind == "server":
    system = ParameterServer(model, torch.optim.SGD(model.parameters(), lr=0.01), regression_loss, batches,
                             num_workers=3)
else:
    system = Hogwild(model, regression_loss, batches, num_workers=3, tuner=None, lr=0.001)
with system:
    if scenario == "large_gradient":
        system.run(6, timeout=60)  # every worker is busy computing and pushing gradients
    print(" ".join(str(system.worker_pid(i)) for i in range(3)), flush=True)
    system.run(10 ** 9, timeout=60)  # never reached: the test kills this process long before
"""


def _running(pid):
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("scenario", ["delayed_start", "large_gradient"])
@pytest.mark.parametrize("system", ["server", "hogwild"])
def test_workers_exit_when_their_parent_is_killed(system, scenario):
    tests = os.path.dirname(HERE)  # (the wide model lives there)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, tests, ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, system, scenario], stdout=subprocess.PIPE, env=env,
                              text=True)
    pids = []
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(_running(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 30  # a bound for the wait, not a timing assertion
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(p) for p in pids), "orphaned workers kept running"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        for pid in pids:  # never leave anything behind, even when the test fails
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
