"""The Ray parameter server on a local Ray instance (2 CPUs, loopback). Every test is bounded (its own
timeouts and pytest-timeout); the trainers kill their actors and the fixtures shut Ray down, which ends
every process Ray started. Skipped, with the reason, only when Ray is not installed."""

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -c constraints.txt -e '.[ray]'")

import ray_problems  # noqa: E402
import wide_problem  # noqa: E402
from yellowfin import YellowFin  # noqa: E402
from yellowfin.asynchrony.flat import loss_and_flat_gradient  # noqa: E402
from yellowfin.asynchrony.server_core import ServerCore  # noqa: E402
from yellowfin.asynchrony.workers import prepare_worker  # noqa: E402
from yellowfin.distributed.ray_server import RUN_WORKERS_AT_NORMAL_PRIORITY, RayAsyncTrainer  # noqa: E402

pytestmark = pytest.mark.timeout(180)
RUN_TIMEOUT_S = 90
# Workers at normal priority, as the trainer's own Ray runs them (Ray's default niceness of 15 starved them
# on a busy machine: the server actor took two minutes to start and the tests hit their timeouts).
LOCAL_RAY = dict(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False, _system_config=RUN_WORKERS_AT_NORMAL_PRIORITY)
TEST_PROBLEMS = (ray_problems, wide_problem)  # (ray_problems re-exports the wide model from wide_problem)


@pytest.fixture(scope="module")
def ray_module():
    """Ship the test problems to the workers by value (they cannot import the tests); shut down at the end."""
    for problems in TEST_PROBLEMS:
        ray.cloudpickle.register_pickle_by_value(problems)
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for problems in TEST_PROBLEMS:
            ray.cloudpickle.unregister_pickle_by_value(problems)


@pytest.fixture
def local_ray(ray_module):
    """One local Ray for the module, (re)started if a test shut it down."""
    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _wait_until_gone(pids, what):
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still running: {[pid for pid in pids if _alive(pid)]}")
        time.sleep(0.1)


def _trainer(**options):
    return RayAsyncTrainer(ray_problems.make_model(0), ray_problems.loss_fn, ray_problems.batches,
                           num_workers=2, **options)


def _niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # (field 19 of stat)


def test_trainer_starts_and_stops_its_own_local_ray(ray_module):
    if ray.is_initialized():  # (another test's instance: local_ray starts a new one when needed)
        ray.shutdown()
    own_options = {key: value for key, value in LOCAL_RAY.items() if key != "_system_config"}
    with _trainer(init_options=own_options) as trainer:
        assert ray.is_initialized()
        # A run of a few updates is over before a worker process that is still starting could join it: the first
        # run waits for all of them, so that both take part from the first update.
        first = trainer.run(6, timeout=RUN_TIMEOUT_S)
        assert first["version"] == 6 and set(first["applied_per_worker"]) == {0, 1}
        assert trainer.run(24, timeout=RUN_TIMEOUT_S)["version"] == 30
        pids = list(trainer.worker_pids().values())
        # The trainer's own Ray runs its workers at this process's priority, not at Ray's niceness 15.
        assert {_niceness(pid) for pid in pids} == {_niceness(os.getpid())}
    assert not ray.is_initialized()
    _wait_until_gone(pids, "worker processes of a Ray that was shut down")


def test_run_times_out_while_the_server_is_still_starting(local_ray):
    # (The server's optimizer takes a minute to build; the message is only raised before the server answers.)
    with _trainer(optimizer_fn=ray_problems.slow_optimizer) as trainer:
        with pytest.raises(TimeoutError, match="did not answer within 2s"):
            trainer.run(10, timeout=2)


def _wait_for(condition, what):
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_killed_worker_is_restarted_while_the_server_goes_on(local_ray):
    with _trainer(closed_loop=True, max_restarts=2) as trainer:
        trainer.run(20, timeout=RUN_TIMEOUT_S)  # both workers are up and registered
        victim_pid = trainer.worker_pids()[0]
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(trainer.run(10**7, timeout=RUN_TIMEOUT_S)))
        runner.start()
        try:
            _wait_for(lambda: trainer.status()["version"] >= 60, "the run to get going")
            before_kill = trainer.report()
            os.kill(victim_pid, signal.SIGKILL)
            # The restarted worker registers, then contributes gradients (the dead one cannot).
            _wait_for(lambda: trainer.report()["applied_per_worker"][0]
                      > before_kill["applied_per_worker"][0] + 20, "the restarted worker to contribute")
        finally:
            trainer.stop()
            runner.join(RUN_TIMEOUT_S)
        assert not runner.is_alive(), "the run did not end"
    assert outcome["restarts"] == {0: 1} and outcome["lost_workers"] == []
    restarted = [r for r in outcome["registrations"] if r["worker"] == 0 and r["incarnation"] == 1]
    assert len(restarted) == 1 and restarted[0]["pid"] != victim_pid
    # Worker 1 kept the server going while Ray restarted worker 0.
    assert restarted[0]["version"] > before_kill["version"]
    assert outcome["applied_per_worker"][1] > before_kill["applied_per_worker"][1]


def test_closed_loop_yellowfin_trains_and_its_atomic_checkpoint_resumes_at_a_new_server(local_ray, tmp_path):
    path = tmp_path / "server.pt"
    model = ray_problems.make_model(0)
    initial = ray_problems.eval_loss(model)
    with _trainer(closed_loop=True, checkpoint_path=str(path), checkpoint_every=200) as trainer:
        report = trainer.run(450, timeout=RUN_TIMEOUT_S)
        model.load_state_dict(trainer.model_state_dict())
        pids = list(trainer.worker_pids().values())
    _wait_until_gone(pids, "worker actors of a trainer that was shut down")  # Ray itself keeps running
    assert report["version"] == 450
    assert sum(report["applied_per_worker"].values()) == 450
    assert set(report["applied_per_worker"]) == {0, 1}  # both workers contributed
    assert sum(report["staleness_counts"].values()) == 450
    assert report["rejected"] == 0 and report["lost_workers"] == []
    # The controller drives YellowFin's momentum offset from the sensed total momentum.
    assert report["optimizer"]["momentum_offset"] == pytest.approx(report["momentum_offset"])
    assert report["optimizer"]["step"] == 450
    assert math.isfinite(report["mu_hat"])  # sensed
    assert ray_problems.eval_loss(model) < 0.05 * initial

    assert sorted(os.listdir(tmp_path)) == ["server.pt"]  # written to a temporary name, then renamed
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == 400
    assert saved["optimizer"]["tuners"][0]["step"] == 400
    with _trainer(closed_loop=True, checkpoint_path=str(path), checkpoint_every=200, resume=True) as trainer:
        assert trainer.report()["resumed_from"] == 400
        for name, value in trainer.model_state_dict().items():
            assert torch.equal(value, saved["model"][name])
        report = trainer.run(50, timeout=RUN_TIMEOUT_S)  # (from the checkpoint's 400)
    assert report["version"] == 450 and report["optimizer"]["step"] == 450
    assert torch.load(path, weights_only=True)["version"] == 400  # next checkpoint is due at 600


def test_an_error_in_a_worker_stops_the_run_and_reaches_the_caller(local_ray):
    with RayAsyncTrainer(ray_problems.make_model(0), ray_problems.loss_fn, ray_problems.failing_batches,
                         num_workers=2) as trainer:
        with pytest.raises(ray.exceptions.RayTaskError, match="corrupt shard"):
            trainer.run(10**7, timeout=RUN_TIMEOUT_S)
        status = trainer.status()
        assert status["target"] == status["version"] < 10**7  # stopped, not left running


def _process_of(actor) -> int:
    """The pid of an actor's process, asked of the actor itself."""
    return ray.get(actor.__ray_call__.remote(lambda instance: os.getpid()), timeout=RUN_TIMEOUT_S)


def test_random_kills_lose_no_update_and_a_killed_server_leaves_no_worker_running(local_ray, tmp_path):
    """Fault injection, as tests/asynchrony/test_fault_injection.py does for the local systems, in this
    module's Ray. Worker actors are killed at seeded random moments (the first while it starts, before the
    run), yet the run applies exactly its target number of updates, and a checkpoint taken mid-run loads and
    training continues from it. The server is then SIGKILLed at a seeded moment of a second run: that run
    ends with an error, and no process of the trainer is left running once it is shut down. Every actor
    (re)start costs seconds here, so the kills are few and the continuation runs at a local ServerCore,
    the update path the Ray server runs too (resuming on Ray has its own test above)."""
    chaos = random.Random(2024)
    target, checkpoint = 300, tmp_path / "mid_run.pt"
    kill_at = sorted(chaos.sample(range(10, target // 3), 2))  # versions at which a running worker dies
    checkpoint_at = chaos.randrange(target // 3, 2 * target // 3)
    server_kill_delay = chaos.uniform(0.0, 1.0)
    victims, outcome, failure = [], {}, {}

    def run_until_the_server_dies():
        try:
            trainer.run(10**7, timeout=RUN_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 (the test inspects it)
            failure["error"] = error

    with _trainer(closed_loop=True, max_restarts=-1) as trainer:
        ray.kill(trainer.workers[chaos.randrange(2)], no_restart=False)  # while it starts: Ray restarts it
        runner = threading.Thread(target=lambda: outcome.update(trainer.run(target, timeout=RUN_TIMEOUT_S)))
        runner.start()
        try:
            for version in kill_at:
                _wait_for(lambda: trainer.status()["version"] >= version, f"version {version}")
                worker, pid = chaos.choice(sorted(trainer.worker_pids().items()))
                with contextlib.suppress(ProcessLookupError):  # (that incarnation is dead already)
                    os.kill(pid, signal.SIGKILL)
                    victims.append((worker, pid))
            _wait_for(lambda: trainer.status()["version"] >= checkpoint_at, f"version {checkpoint_at}")
            trainer.save_checkpoint(str(checkpoint))
        except BaseException:
            trainer.stop()  # end the run at once, so that the failure shows
            raise
        finally:
            runner.join(RUN_TIMEOUT_S)
        assert not runner.is_alive(), "the run did not end"
        # Nothing lost: every update the server counted was applied by the optimizer, exactly once.
        assert outcome["version"] == target == sum(outcome["applied_per_worker"].values())
        assert outcome["optimizer"]["step"] == target == sum(outcome["staleness_counts"].values())
        assert outcome["rejected"] == 0 and outcome["lost_workers"] == []
        registrations = outcome["registrations"]
        for worker, pid in victims:  # each killed worker came back as a new process
            killed = next(r for r in registrations if r["pid"] == pid)
            assert any(r["worker"] == worker and r["incarnation"] > killed["incarnation"] for r in registrations)

        server_pid = _process_of(trainer.server)
        pids = {server_pid, *(r["pid"] for r in trainer.report()["registrations"])}
        runner = threading.Thread(target=run_until_the_server_dies)
        runner.start()
        try:
            time.sleep(server_kill_delay)
            os.kill(server_pid, signal.SIGKILL)
        finally:
            runner.join(RUN_TIMEOUT_S)
        assert not runner.is_alive(), "the run did not end when its server died"
        assert isinstance(failure.get("error"), ray.exceptions.RayActorError), failure
    _wait_until_gone(pids, "processes of a trainer whose server was killed")

    model = ray_problems.make_model(5)
    core = ServerCore(model, YellowFin(model.parameters()), num_workers=2, closed_loop=True)
    core.load_checkpoint(str(checkpoint))
    saved = core.version
    assert checkpoint_at <= saved < target
    assert core.optimizer.stats()["step"] == saved == sum(core.staleness_counts.values()) == core.controller.calls
    params, batches = prepare_worker(model, ray_problems.batches, 0, seed=7)
    for _ in range(20):
        gradient, loss = loss_and_flat_gradient(ray_problems.loss_fn, model, params, next(batches))
        assert core.apply_gradient(0, core.version, gradient.numpy(), loss)  # (as a Ray worker sends it)
    assert core.version == saved + 20 == core.optimizer.stats()["step"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


DRIVER_SCRIPT = """
import sys, torch
import ray, ray_problems, wide_problem
from yellowfin.distributed.ray_server import RayAsyncTrainer
ray.cloudpickle.register_pickle_by_value(ray_problems)
ray.cloudpickle.register_pickle_by_value(wide_problem)
trainer = RayAsyncTrainer(ray_problems.make_wide_model(0), ray_problems.loss_fn, ray_problems.wide_batches,
                          num_workers=2, closed_loop=False, optimizer_fn=lambda p: torch.optim.SGD(p, lr=1e-3),
                          init_options=dict(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                                            log_to_driver=False))
trainer.run(4, timeout=120)  # both workers are pushing 4 MB gradients
print(" ".join(str(pid) for pid in trainer.worker_pids().values()), flush=True)
trainer.run(10 ** 9, timeout=300)  # never reached: the test kills this driver long before
"""


def test_nothing_outlives_a_killed_driver_while_workers_push_large_gradients():
    """The driver that started Ray is SIGKILLed while its workers push gradients larger than any pipe
    buffer: the workers must exit (Ray ties actors to their driver; nothing in RayAsyncTrainer may keep
    them). Ray's own head processes that the driver started took about a minute more to exit when this was
    written; the test does not wait for them but kills its whole process group at the end."""
    here = os.path.dirname(os.path.abspath(__file__))
    tests = os.path.dirname(here)
    root = os.path.dirname(tests)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, tests, root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER_SCRIPT], stdout=subprocess.PIPE, env=env, text=True,
                              start_new_session=True)
    pids = []
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        driver.kill()
        driver.wait(30)
        deadline = time.monotonic() + RUN_TIMEOUT_S  # a bound for the wait, not a timing assertion
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "Ray workers outlived their driver"
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # this test's own group: never leave anything behind
        except ProcessLookupError:
            pass
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()
        driver.wait(30)
        driver.stdout.close()
