"""Loading a checkpoint into the parameter server or Hogwild!: never runs code from the file, and a load
that fails changes nothing (model, optimizer or tuner, controller, sensor, momentum buffers, counters)."""

import copy
import math

import pytest
import torch

from asynchrony_problems import make_regression_model, regression_batches, regression_loss
from yellowfin import YellowFin
from yellowfin.asynchrony import Hogwild, ParameterServer

pytestmark = pytest.mark.timeout(90)


class _CreatesAFile:
    """Unpickling this object (without weights_only) would run ``open(marker, 'w')``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _server(seed=0):
    model = make_regression_model(seed)
    return ParameterServer(model, YellowFin(model.parameters()), regression_loss, regression_batches,
                           num_workers=2, closed_loop=True)


def _hogwild(seed=0):
    return Hogwild(make_regression_model(seed), regression_loss, regression_batches, num_workers=2,
                   closed_loop=True)


def _trained_server(seed):
    """A server that has applied a few gradients (no processes needed: apply_gradient is the update path)."""
    server = _server(seed)
    batches = regression_batches(0, seed)
    for _ in range(25):
        server.optimizer.zero_grad()
        regression_loss(server.model, next(batches)).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in server.params]).numpy().copy()
        assert server.apply_gradient(0, server.version, grad)
    return server


def _trained_hogwild(seed):
    hogwild = _hogwild(seed)
    with hogwild:
        hogwild.run(40, timeout=60)
    return hogwild


def _assert_same(a, b, where="state"):
    """Recursive equality of two state dicts (tensors exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(
            torch.nan_to_num(a, nan=1.5e-7), torch.nan_to_num(b, nan=1.5e-7)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def _break(state, how):
    state = copy.deepcopy(state)
    if how == "optimizer_state_shape":
        optimizer_key = "optimizer" if "optimizer" in state else "tuner"
        slots = state[optimizer_key]["state"]
        first = slots[sorted(slots)[0]]
        name = next(k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
        first[name] = torch.zeros(first[name].numel() + 3)
    elif how == "model_key":
        state["model"]["no_such_layer.weight"] = torch.zeros(2)
    elif how == "momentum_buffer_shape":
        state["momentum_buffers"][0] = torch.zeros(3)
    return state


@pytest.mark.parametrize("system", ["server", "hogwild"])
def test_a_checkpoint_that_would_run_code_is_refused(system, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    target = _server() if system == "server" else _hogwild()
    state = target.state_dict()
    state["model"] = _CreatesAFile(str(marker))
    torch.save(state, path)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        target.load_checkpoint(str(path))
    assert not marker.exists()
    _assert_same(target.state_dict(), before)


@pytest.mark.parametrize("how", ["optimizer_state_shape", "model_key"])
def test_a_failing_server_load_changes_nothing(how, tmp_path):
    path = str(tmp_path / "server.pt")
    saved = _trained_server(seed=1).state_dict()
    torch.save(_break(saved, how), path)
    server = _trained_server(seed=0)
    before = copy.deepcopy(server.state_dict())
    with pytest.raises((ValueError, RuntimeError, KeyError)):
        server.load_checkpoint(path)
    _assert_same(server.state_dict(), before)
    assert server.sensor.observations == before["sensor"]["observations"]
    torch.save(saved, path)  # and the intact checkpoint still loads
    server.load_checkpoint(path)
    _assert_same(server.state_dict(), saved)


# Parallel to the server's test above on purpose: the same promise, kept by the other system.
@pytest.mark.parametrize("how", ["optimizer_state_shape", "model_key", "momentum_buffer_shape"])
def test_a_failing_hogwild_load_changes_nothing(how, tmp_path):
    path = str(tmp_path / "hogwild.pt")
    saved = _trained_hogwild(seed=1).state_dict()
    torch.save(_break(saved, how), path)
    hogwild = _trained_hogwild(seed=0)
    before = copy.deepcopy(hogwild.state_dict())
    with pytest.raises((ValueError, RuntimeError, KeyError)):
        hogwild.load_checkpoint(path)
    _assert_same(hogwild.state_dict(), before)
    torch.save(saved, path)
    hogwild.load_checkpoint(path)
    _assert_same(hogwild.state_dict(), saved)
