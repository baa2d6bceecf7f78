import multiprocessing
import os
import signal
import time

import pytest
import torch

from asynchrony_problems import (assert_all_gone, failing_loss, make_regression_model, poisoned_batches,
                                 regression_batches, regression_eval_loss, regression_loss)
from yellowfin.asynchrony import Hogwild, WorkerFailed
from yellowfin.asynchrony.hogwild import heavy_ball_in_place

pytestmark = pytest.mark.timeout(90)


def test_heavy_ball_in_place_matches_torch_sgd():
    p1 = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p2 = torch.nn.Parameter(p1.detach().clone())
    buffer = torch.zeros(2)
    sgd = torch.optim.SGD([p2], lr=0.1, momentum=0.7)
    for g in (torch.tensor([0.5, 0.1]), torch.tensor([-0.3, 0.2])):
        heavy_ball_in_place([p1], [buffer], [g], 0.7, 0.1)
        p2.grad = g.clone()
        sgd.step()
    assert torch.allclose(p1, p2)


def test_fixed_hyperparameters_train_the_shared_model():
    model = make_regression_model(0)
    before = regression_eval_loss(model)
    hogwild = Hogwild(model, regression_loss, regression_batches, num_workers=2, tuner=None, lr=0.05,
                      momentum=0.5)
    with hogwild:
        pids = [hogwild.worker_pid(i) for i in range(2)]
        report = hogwild.run(400, timeout=60)
    assert_all_gone(pids)
    assert report["version"] >= 400
    assert report["mu"] == 0.5 and report["alpha"] == 0.05
    assert regression_eval_loss(model) < 0.05 * before  # the caller's model is the trained one


def test_closed_loop_yellowfin_hogwild_tunes_shared_mu_and_alpha():
    model = make_regression_model(0)
    before = regression_eval_loss(model)
    hogwild = Hogwild(model, regression_loss, regression_batches, num_workers=2, closed_loop=True)
    initial = hogwild.shared.hyper.clone()
    with hogwild:
        report = hogwild.run(600, timeout=60)
    assert report["tuned_gradients"] > 0
    assert not torch.equal(hogwild.shared.hyper, initial)  # the tuner wrote mu and alpha
    stats = hogwild.tuner.stats()
    assert report["mu"] == pytest.approx(stats["applied_momentum"])
    assert stats["momentum_offset"] == pytest.approx(hogwild.controller.offset)
    assert regression_eval_loss(model) < before
    state = hogwild.state_dict()
    assert state["controller"]["calls"] == report["tuned_gradients"]
    # The staleness of every gradient the tuner saw is counted, reported and told to the tuner (which, being
    # the reference, ignores it); with two workers each is at most the updates of the whole run.
    counts = report["staleness_counts"]
    assert sum(counts.values()) == report["tuned_gradients"] and all(0 <= tau < 600 for tau in counts)
    assert report["mean_staleness"] == pytest.approx(sum(tau * n for tau, n in counts.items()) / sum(counts.values()))
    assert stats["staleness"] == pytest.approx(report["mean_staleness"])
    assert hogwild.tuner.param_groups[0]["tuner"] == "reference"  # Hogwild's default tuner


def test_checkpoint_carries_buffers_tuner_and_controller_and_a_resumed_run_continues(tmp_path):
    path = str(tmp_path / "hogwild.pt")
    hogwild = Hogwild(make_regression_model(0), regression_loss, regression_batches, num_workers=2,
                      closed_loop=True)
    with hogwild:
        hogwild.run(200, timeout=60)
    hogwild.save_checkpoint(path)
    assert os.listdir(tmp_path) == ["hogwild.pt"]
    saved = torch.load(path, weights_only=True)

    resumed = Hogwild(make_regression_model(1), regression_loss, regression_batches, num_workers=2,
                      closed_loop=True)
    resumed.load_checkpoint(path)
    assert resumed.version == saved["version"]
    for name, value in saved["model"].items():
        assert torch.equal(resumed.model.state_dict()[name], value)
    for buffer, value in zip(resumed.shared.buffers, saved["momentum_buffers"]):
        assert torch.equal(buffer, value)
    assert resumed.controller.offset == hogwild.controller.offset
    assert resumed.controller.calls == hogwild.controller.calls
    assert resumed.tuner.stats()["step"] == hogwild.tuner.stats()["step"]
    assert resumed.tuner.stats()["momentum_offset"] == pytest.approx(hogwild.controller.offset)
    assert float(resumed.shared.hyper[0]) == pytest.approx(float(hogwild.shared.hyper[0]))
    with resumed:
        pids = [resumed.worker_pid(i) for i in range(2)]
        report = resumed.run(100, timeout=60)
    assert_all_gone(pids)
    assert report["version"] >= saved["version"] + 100


def test_open_loop_checkpoint_does_not_load_into_a_closed_loop_hogwild():
    open_loop = Hogwild(make_regression_model(0), regression_loss, regression_batches, num_workers=2)
    closed = Hogwild(make_regression_model(0), regression_loss, regression_batches, num_workers=2,
                     closed_loop=True)
    with pytest.raises(ValueError):
        closed.load_state_dict(open_loop.state_dict())


@pytest.mark.parametrize("tuner", ["yellowfin", None])
def test_non_finite_gradients_change_nothing_and_are_counted(tuner):
    """Worker 0 computes a NaN gradient every other batch: those are skipped, never applied."""
    model = make_regression_model(0)
    before = regression_eval_loss(model)
    hogwild = Hogwild(model, regression_loss, poisoned_batches, num_workers=2, tuner=tuner, lr=0.05,
                      momentum=0.5)
    with hogwild:
        report = hogwild.run(300, timeout=60)
    assert report["rejected"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in hogwild.shared.buffers)
    assert regression_eval_loss(model) < before


def test_a_worker_whose_loss_raises_is_restarted_within_its_budget_then_the_run_stops_with_its_error():
    hogwild = Hogwild(make_regression_model(0), failing_loss, regression_batches, num_workers=2, tuner=None,
                      max_restarts=1)
    with hogwild:
        with pytest.raises(WorkerFailed, match="the loss exploded on purpose") as raised:
            hogwild.run(100)  # no timeout: the restart budget, not the caller, ends this run
        assert hogwild.alive_workers == []
    assert "Traceback" in str(raised.value) and "in failing_loss" in str(raised.value)
    deaths = [f for f in hogwild.worker_failures if f["worker"] == raised.value.worker_id]
    assert len(deaths) == 2 and hogwild.version == 0


def _hold_forever(lock):
    lock.acquire()
    while True:
        time.sleep(1)


def _abandon_version_lock(hogwild) -> None:
    """Stand in for a worker that dies inside the version lock: a process takes the lock, then is killed."""
    holder = multiprocessing.get_context("fork").Process(target=_hold_forever,
                                                         args=(hogwild.shared.counter_lock,), daemon=True)
    holder.start()
    while hogwild.shared.counter_lock.acquire(timeout=0.01):  # until the holder has it
        hogwild.shared.counter_lock.release()
    holder.kill()
    holder.join(10)


def test_a_worker_killed_while_holding_the_version_lock_does_not_stall_the_run():
    """The version lock is the only lock workers take; one killed inside it must not block the others."""
    hogwild = Hogwild(make_regression_model(0), regression_loss, regression_batches, num_workers=2, tuner=None)
    with hogwild:
        hogwild.run(20, timeout=60)
        _abandon_version_lock(hogwild)
        os.kill(hogwild.worker_pid(0), signal.SIGKILL)  # and a worker dies, whose death the tuner notices
        report = hogwild.run(50, timeout=60)
    assert report["version"] >= 70 and len(report["worker_failures"]) == 1


def test_workers_waiting_on_an_abandoned_version_lock_still_stop():
    """A worker killed inside the version lock leaves it held until the tuner frees it; if the tuner is gone
    (or stops) first, the workers waiting on that lock must still see the stop signal and exit, not wait for
    ever (a leak the fault-injection test found when the server was killed inside that window)."""
    hogwild = Hogwild(make_regression_model(0), regression_loss, regression_batches, num_workers=2, tuner=None)
    with hogwild:
        hogwild.run(5, timeout=60)
        _abandon_version_lock(hogwild)
        stuck_at = hogwild.version
        hogwild.shared.limit[0] = stuck_at + 10 ** 6  # the workers compute, update, then wait on the lock
        time.sleep(0.5)
        assert hogwild.version == stuck_at  # nobody got past the abandoned lock
        hogwild.shared.stop.set()  # as a dead tuner reads to them: should_stop() is true
        workers = list(hogwild._workers.values())
        for process in workers:
            process.join(30)  # a bound for the wait, not a timing assertion
        assert not any(process.is_alive() for process in workers), "a worker kept waiting on the lock"
        assert all(process.exitcode == 0 for process in workers)  # they returned, nobody killed them
