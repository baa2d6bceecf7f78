"""The real parameter server: every test that starts processes is bounded (pytest-timeout and the server's
own run timeout) and leaves no worker alive."""

import logging
import os
import signal

import numpy as np
import pytest
import torch

from asynchrony_problems import (assert_all_gone, failing_loss, make_regression_model, poisoned_batches,
                                 regression_batches, regression_eval_loss, regression_loss)
from yellowfin import YellowFin
from yellowfin.asynchrony import ParameterServer, WorkerFailed

pytestmark = pytest.mark.timeout(90)


def _server(num_workers=3, optimizer_fn=None, batches=regression_batches, loss=regression_loss, **options):
    model = make_regression_model(0)
    optimizer = (optimizer_fn or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5)))(model.parameters())
    return ParameterServer(model, optimizer, loss, batches, num_workers=num_workers, **options)


def test_trains_records_staleness_and_cleans_up():
    server = _server(num_workers=3)
    before = regression_eval_loss(server.model)
    with server:
        pids = [server.worker_pid(i) for i in range(3)]
        report = server.run(300, timeout=60)
    assert_all_gone(pids)
    assert report["version"] == 300
    assert sum(report["staleness_counts"].values()) == 300
    assert len(report["applied_per_worker"]) == 3
    assert report["rejected"] == 0 and report["worker_failures"] == []
    assert regression_eval_loss(server.model) < 0.05 * before


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


@pytest.mark.parametrize("bad, reason", [
    (np.zeros(3, dtype=np.float32), "shape"),
    (np.zeros(36, dtype=np.float64), "dtype"),
    (np.full(36, np.nan, dtype=np.float32), "NaN"),
    (np.r_[np.zeros(35), np.inf].astype(np.float32), "Inf"),
    ([0.0] * 36, "numpy"),
])
def test_bad_gradients_are_rejected_logged_and_not_applied(bad, reason, caplog):
    server = _server()  # never started: apply_gradient is the path every pushed gradient takes
    before = _flat(server.model)
    with caplog.at_level(logging.ERROR, logger="yellowfin.asynchrony"):
        assert server.apply_gradient(0, 0, bad) is False
    assert reason in caplog.text
    assert torch.equal(_flat(server.model), before) and server.version == 0
    assert server.apply_gradient(0, 0, np.ones(36, dtype=np.float32)) is True
    assert server.version == 1 and not torch.equal(_flat(server.model), before)


def test_gradient_from_a_future_version_is_rejected():
    server = _server()
    assert server.apply_gradient(0, 5, np.ones(36, dtype=np.float32)) is False


def test_nan_gradients_from_a_worker_are_rejected_while_training_goes_on():
    server = _server(num_workers=2, batches=poisoned_batches)
    with server:
        report = server.run(100, timeout=60)
    assert report["rejected"] > 0
    assert report["version"] == 100
    assert all(torch.isfinite(p).all() for p in server.model.parameters())


@pytest.mark.parametrize("replace", [True, False])
def test_sigkilled_worker_does_not_stop_training(replace, caplog):
    server = _server(num_workers=3, replace_dead_workers=replace)
    with caplog.at_level(logging.WARNING, logger="yellowfin.asynchrony"):
        with server:
            server.run(30, timeout=60)
            victim = server.worker_pid(1)
            os.kill(victim, signal.SIGKILL)
            report = server.run(150, timeout=60)
            pids = [server.worker_pid(i) for i in server.alive_workers]
        assert_all_gone(pids + [victim])
    assert report["version"] == 180
    assert [f["worker"] for f in report["worker_failures"]] == [1]
    assert report["worker_failures"][0]["exitcode"] == -signal.SIGKILL
    assert "died" in caplog.text
    assert report["replacements"] == (1 if replace else 0)
    if replace:
        assert 1 in server._workers or True  # stopped now; the replacement applied gradients:
        assert report["applied_per_worker"][1] > 0


def test_every_worker_dead_without_replacement_raises():
    server = _server(num_workers=2, replace_dead_workers=False)
    with server:
        server.run(5, timeout=60)
        for worker_id in list(server.alive_workers):
            server.kill_worker(worker_id)
        with pytest.raises(RuntimeError):
            server.run(1000, timeout=60)


def test_checkpoint_is_atomic_and_a_resumed_run_continues(tmp_path):
    path = str(tmp_path / "server.pt")
    server = _server(num_workers=2, optimizer_fn=YellowFin, closed_loop=True, checkpoint_path=path,
                     checkpoint_every=10)
    with server:
        server.run(35, timeout=60)
    assert os.listdir(tmp_path) == ["server.pt"]  # no temporary file left behind
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == 30 and saved["controller"] is not None

    resumed = _server(num_workers=2, optimizer_fn=YellowFin, closed_loop=True, checkpoint_path=path)
    resumed.load_checkpoint()
    assert resumed.version == 30
    for name, value in saved["model"].items():
        assert torch.equal(resumed.model.state_dict()[name], value)
    assert resumed.optimizer.stats()["step"] == 30
    assert resumed.controller.calls == saved["controller"]["calls"]
    with resumed:
        report = resumed.run(20, timeout=60)
    assert report["version"] == 50


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "server.pt")
    server = _server()
    server.save_checkpoint(path)
    server.apply_gradient(0, 0, np.ones(36, dtype=np.float32))

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        server.save_checkpoint(path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["version"] == 0


def test_closed_loop_yellowfin_on_the_server():
    server = _server(num_workers=3, optimizer_fn=YellowFin, closed_loop=True)
    with server:
        report = server.run(200, timeout=60)
    assert report["mu_hat"] is not None and server.controller.calls == 200
    assert server.optimizer.stats()["momentum_offset"] == pytest.approx(server.controller.offset)
    assert report["mean_staleness"] > 0


def test_the_scale_free_tuner_trains_on_the_server_closed_loop():
    server = _server(num_workers=3, optimizer_fn=lambda p: YellowFin(p, tuner="scale_free"), closed_loop=True)
    before = regression_eval_loss(server.model)
    with server:
        report = server.run(300, timeout=60)
    assert report["mean_staleness"] > 0
    assert server.optimizer.stats()["staleness"] == pytest.approx(report["mean_staleness"])
    assert regression_eval_loss(server.model) < 0.05 * before


def test_the_server_tells_the_optimizer_the_mean_staleness_of_what_it_applies():
    # (never started: apply_gradient is the path every pushed gradient takes)
    server = _server(num_workers=3, optimizer_fn=lambda p: YellowFin(p, tuner="scale_free"), closed_loop=True)
    for pulled in (0, 0, 1, 1):  # staleness 0, 1, 1, 2
        assert server.apply_gradient(0, pulled, np.ones(36, dtype=np.float32)) is True
    assert server.optimizer.stats()["staleness"] == pytest.approx(1.0)
    assert server.report()["mean_staleness"] == pytest.approx(1.0)


def test_a_worker_whose_loss_raises_is_restarted_within_its_budget_then_the_run_stops_with_its_error():
    server = _server(num_workers=2, loss=failing_loss, max_restarts=2)
    with server:
        with pytest.raises(WorkerFailed, match="the loss exploded on purpose") as raised:
            server.run(100)  # no timeout: the restart budget, not the caller, ends this run
        assert server.alive_workers == []  # the run is stopped
    message = str(raised.value)
    assert "Traceback" in message and "in failing_loss" in message and "max_restarts=2" in message
    deaths = [f for f in server.worker_failures if f["worker"] == raised.value.worker_id]
    assert len(deaths) == 3 and all("ValueError" in f["error"] for f in deaths)
    assert server.version == 0 and server.replacements <= 4


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_max_restarts_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="max_restarts"):
        _server(max_restarts=bad)
