"""Fixtures for the benchmark tests: generated data only (see bench_fixtures.py), Agg plots."""

import matplotlib
import pytest

from bench_fixtures import make_text, write_fake_fashion_mnist

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture
def tiny_task_options(fmnist_dir, text_path):
    """Options that make every task cheap: tiny models, tiny evaluation sets, generated data."""
    return {
        "quadratic": {},
        "digits_mlp": {"hidden": 16},
        "fmnist_resnet": {"data_dir": str(fmnist_dir), "blocks_per_stage": 1, "width": 4, "batch_size": 16,
                          "eval_examples": 20},
        "char_lstm": {"text_path": str(text_path), "hidden": 16, "seq_len": 16, "batch_size": 4,
                      "eval_chars": 256},
        "logreg": {"data_dir": str(fmnist_dir), "batch_size": 16},
        "autoencoder": {"data_dir": str(fmnist_dir), "batch_size": 16},
        "fmnist_resnet8": {"data_dir": str(fmnist_dir), "width": 4, "batch_size": 16, "train_examples": 64,
                           "eval_examples": 20},
    }
