import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from yellowfin.bench.tasks import TASKS, ResNet, get_task


def test_registry_names_match_the_contract():
    assert set(TASKS) == {"quadratic", "digits_mlp", "fmnist_resnet", "char_lstm", "logreg", "autoencoder",
                          "fmnist_resnet8"}
    with pytest.raises(KeyError, match="choose from"):
        get_task("imagenet")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_contract(name, tiny_task_options):
    task = get_task(name, **tiny_task_options[name])
    assert task.name == name
    assert isinstance(task.default_steps, int) and 0 < task.quick_steps < task.default_steps
    for grid in task.lr_grids.values():  # >= 5 points, log-spaced, increasing
        assert len(grid) >= 5
        ratios = np.diff(np.log10(grid))
        assert np.all(ratios > 0) and np.allclose(ratios, ratios[0], atol=0.05)

    model = task.make_model(seed=3)
    assert isinstance(model, nn.Module)
    same = task.make_model(seed=3)
    for a, b in zip(model.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)

    batches = task.train_batches(seed=5)
    first = list(itertools.islice(batches, 4))
    again = list(itertools.islice(task.train_batches(seed=5), 4))
    for x, y in zip(first, again):
        for p, q in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
            assert torch.equal(p, q)
    assert len(list(itertools.islice(batches, 50))) == 50  # endless: more than one tiny epoch

    loss = task.loss(model, first[0])
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    for split in ("val", "test"):
        result = task.evaluate(model, split)
        assert {"loss", task.metric} <= set(result)
        assert all(math.isfinite(v) for v in result.values())
    assert model.training  # evaluation restores training mode
    with pytest.raises(ValueError):
        task.evaluate(model, "train")
    assert task.config()["name"] == name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_few_sgd_steps_reduce_the_loss(name, tiny_task_options):
    task = get_task(name, **tiny_task_options[name])
    model = task.make_model(0)
    lr = {"quadratic": 0.01, "digits_mlp": 0.5, "fmnist_resnet": 0.05, "char_lstm": 1.0, "logreg": 0.01,
          "autoencoder": 1.0, "fmnist_resnet8": 0.05}[name]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    batches = task.train_batches(0)
    probe = next(task.train_batches(99))
    with torch.no_grad():
        before = task.loss(model, probe).item()
    for batch in itertools.islice(batches, 40):
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    with torch.no_grad():
        after = task.loss(model, probe).item()
    assert after < before


def test_quadratic_spectrum_and_known_optimum():
    task = get_task("quadratic")
    eig = task.eigenvalues
    assert len(eig) == 100
    assert int(((eig > 0) & (eig < 1)).sum()) == 90 and int(((eig > 30) & (eig < 60)).sum()) == 10
    np.testing.assert_allclose(torch.linalg.eigvalsh(task.hessian).numpy(), eig.numpy(), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(task.hessian, torch.diag(torch.diagonal(task.hessian)))  # rotated, not diagonal
    model = task.make_model(0)
    with torch.no_grad():
        model.x.copy_(task.optimum.float())
    result = task.evaluate(model, "test")
    assert result["excess_loss"] < 1e-8 and result["distance"] < 1e-5
    # The mean stochastic gradient is H (x - x*): unbiased data noise.
    model = task.make_model(1)
    grads = []
    for batch in itertools.islice(task.train_batches(0), 400):
        model.zero_grad()
        task.loss(model, batch).backward()
        grads.append(model.x.grad.clone())
    expected = task.hessian.float() @ (model.x.detach() - task.optimum.float())
    mean = torch.stack(grads).mean(0)
    assert torch.linalg.norm(mean - expected) < 0.1 * torch.linalg.norm(expected)


def test_quadratic_problem_fixed_by_problem_seed_not_run_seed():
    a, b, c = get_task("quadratic"), get_task("quadratic"), get_task("quadratic", problem_seed=1)
    assert torch.equal(a.hessian, b.hessian) and torch.equal(a.optimum, b.optimum)
    assert not torch.equal(a.hessian, c.hessian)
    assert not torch.equal(a.make_model(0).x, a.make_model(1).x)


def test_resnet20_has_twenty_weighted_layers():
    model = ResNet(blocks_per_stage=3)
    main_path = [m for name, m in model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)) and "shortcut" not in name]
    assert len(main_path) == 20
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_char_lstm_loss_is_mean_over_batch_and_sequence(tiny_task_options):
    task = get_task("char_lstm", **tiny_task_options["char_lstm"])
    model = task.make_model(0)
    inputs, targets = next(task.train_batches(0))
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next characters
    logits = model(inputs)
    per_token = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none")
    assert task.loss(model, (inputs, targets)).item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    result = task.evaluate(model, "val")
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # an untrained model is near-uniform over the alphabet
    assert result["perplexity"] == pytest.approx(len(task.corpus.alphabet), rel=0.3)


def test_missing_fmnist_data_is_reported_when_used(tmp_path):
    from yellowfin.bench.data import DataNotFoundError

    task = get_task("fmnist_resnet", data_dir=str(tmp_path))  # building the task is free
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        next(task.train_batches(0))


def test_logistic_regression_is_one_linear_layer_on_flat_pixels(tiny_task_options):
    task = get_task("logreg", **tiny_task_options["logreg"])
    model = task.make_model(0)
    assert isinstance(model, nn.Linear) and (model.in_features, model.out_features) == (28 * 28, 10)
    inputs, labels = next(task.train_batches(0))
    assert inputs.shape == (16, 28 * 28) and labels.shape == (16,)
    expected = nn.functional.cross_entropy(inputs @ model.weight.T + model.bias, labels)
    assert task.loss(model, (inputs, labels)).item() == pytest.approx(expected.item(), rel=1e-6)
    digits = get_task("logreg", dataset="digits")  # the data set that needs no system package
    assert digits.make_model(0).in_features == 64 and digits.splits.train[0].shape[1] == 64
    with pytest.raises(ValueError, match="dataset must be one of fashion_mnist, digits"):
        get_task("logreg", dataset="cifar")


def test_autoencoder_reconstructs_pixel_intensities(tiny_task_options, fmnist_dir):
    from yellowfin.bench.data import read_idx

    task = get_task("autoencoder", **tiny_task_options["autoencoder"])
    model = task.make_model(0)
    linear = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linear] == [256, 128, 64, 16, 64, 128, 256, 784]  # deep, 16-unit code
    assert sum(isinstance(m, nn.Tanh) for m in model) == 6
    # The targets are the raw intensities in [0, 1], whatever normalisation the loader applies.
    raw = read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    test_pixels = task.splits.test[0]
    np.testing.assert_allclose(test_pixels.numpy(), raw, atol=1e-5)
    pixels, _ = next(task.train_batches(0))
    logits = model(pixels)
    expected = nn.functional.binary_cross_entropy(torch.sigmoid(logits), pixels)
    assert task.loss(model, (pixels, None)).item() == pytest.approx(expected.item(), rel=1e-4)
    result = task.evaluate(model, "test")
    with torch.no_grad():
        mse = (torch.sigmoid(model(test_pixels)) - test_pixels).square().mean().item()
    assert task.metric == "mse" and not task.higher_is_better
    assert result["mse"] == pytest.approx(mse, rel=1e-5)


def test_small_resnet_budget_covers_three_epochs():
    task = get_task("fmnist_resnet8")
    assert task.default_steps * task.batch_size >= 3 * task.train_examples
    model = task.make_model(0)
    assert sum(isinstance(m, nn.Conv2d) for name, m in model.named_modules() if "shortcut" not in name) == 7
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
