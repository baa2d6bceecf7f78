"""Generated stand-ins for the benchmark data: tiny Fashion-MNIST-shaped IDX files and a short text. The
installed data sets are never read by the tests."""

import random

import numpy as np

from yellowfin.bench.data import write_idx

FMNIST_TRAIN, FMNIST_TEST = 96, 40


def write_fake_fashion_mnist(directory, n_train=FMNIST_TRAIN, n_test=FMNIST_TEST, gz=True, seed=0):
    """Images whose mean brightness encodes the class, so a model can learn something in a few steps."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8) + (labels[:, None, None] * 19).astype(np.uint8)
        write_idx(directory / f"{part}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{part}-labels-idx1-ubyte{suffix}", labels)
    return directory


def make_text(n_chars=30_000, seed=0):
    rng = random.Random(seed)
    words = ["and", "the", "lord", "said", "unto", "him", "light", "earth", "water", "day", "night", "was"]
    pieces, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".\n"
        pieces.append(line)
        size += len(line)
    return "".join(pieces)
