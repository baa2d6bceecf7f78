import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loss_scale.py"


@pytest.fixture(scope="module")
def loss_scale():
    spec = importlib.util.spec_from_file_location("loss_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scale_multiplies_the_training_loss_and_the_reported_mse_is_unscaled(loss_scale):
    scales = (1e-2, 1.0, 1e2)
    results = loss_scale.measure({"adam": lambda p: torch.optim.Adam(p, lr=1e-2),
                                  "sgd": lambda p: torch.optim.SGD(p, lr=1e-3)},
                                 seeds=[0], scales=scales, batch_sizes=(8, 32), steps=20)
    adam = [values[0] for values in results["scale"]["adam"].values()]
    sgd = [values[0] for values in results["scale"]["sgd"].values()]
    assert adam == pytest.approx([adam[1]] * 3, rel=1e-3)  # Adam is invariant up to its epsilon
    assert sgd[0] > sgd[1] > sgd[2]  # a fixed SGD step moves further the larger the loss
    assert results["batch"]["adam"]["32"] == results["scale"]["adam"]["1.0"]  # c = 1, batch 32: the same run
    # The reported number is the plain full-batch MSE of the trained model, whatever c was: with a zero step the
    # model stays at its initial point, whose MSE is computed here directly.
    x, y = loss_scale.regression_data()
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(initial(x), y).item()
    frozen = loss_scale.train(lambda p: torch.optim.SGD(p, lr=0.0), 1e4, 32, 0, (x, y), steps=3)
    assert frozen == pytest.approx(expected, rel=1e-6)
