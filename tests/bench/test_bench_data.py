import gzip
import subprocess

import numpy as np
import pytest
import torch

from yellowfin.bench import data
from yellowfin.bench.data import DataNotFoundError

from bench_fixtures import write_fake_fashion_mnist


@pytest.mark.parametrize("name", ["arr.idx", "arr.idx.gz"])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([5, 0, 9], dtype=np.uint8),
    np.array([[1.5, -2.0]], dtype=np.float32),
    np.array([70000, -3], dtype=np.int32),
])
def test_idx_round_trip(tmp_path, name, array):
    write_idx_path = tmp_path / name
    data.write_idx(write_idx_path, array)
    back = data.read_idx(write_idx_path)
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_layout(tmp_path):
    path = tmp_path / "labels"
    data.write_idx(path, np.array([3, 1], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 0x08, 1, 0, 0, 0, 2, 3, 1])


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02\x00\x00")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 10, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(short)


def test_fashion_mnist_splits_from_a_user_directory(tmp_path):
    directory = write_fake_fashion_mnist(tmp_path / "fm", n_train=120, n_test=30, gz=False)
    splits = data.load_fashion_mnist(directory)
    train_x, train_y = splits.train
    val_x, val_y = splits.val
    test_x, test_y = splits["test"]
    assert val_x.shape == (10, 1, 28, 28)  # 1/12 of the training images held out
    assert train_x.shape == (110, 1, 28, 28) and test_x.shape == (30, 1, 28, 28)
    assert train_y.dtype == torch.int64 and set(train_y.tolist()) <= set(range(10))
    # train and val partition the original training set
    raw = data.read_idx(directory / "train-images-idx3-ubyte")
    raw_sums = sorted(raw.reshape(len(raw), -1).sum(axis=1).tolist())
    pixels = torch.cat([train_x, val_x]) * 0.353 + 0.286
    ours = sorted(torch.round(pixels.reshape(120, -1).sum(dim=1) * 255).long().tolist())
    assert ours == raw_sums
    raw_test = data.read_idx(directory / "t10k-labels-idx1-ubyte")
    assert test_y.tolist() == raw_test.tolist()  # test set kept in the official order


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")  # partial install is still missing
    with pytest.raises(DataNotFoundError):
        data.fashion_mnist_dir(tmp_path)


def test_fashion_mnist_env_variable(tmp_path, monkeypatch):
    directory = write_fake_fashion_mnist(tmp_path / "env")
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(directory))
    assert data.fashion_mnist_dir() == directory


RAW_BIBLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.
"""


def test_clean_bible_text_drops_verse_numbers():
    cleaned = data.clean_bible_text(RAW_BIBLE)
    assert cleaned == "Genesis 1\n\nIn the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n"


def test_bible_text_from_file(text_path, monkeypatch):
    monkeypatch.delenv(data.BIBLE_ENV, raising=False)
    assert data.read_bible_text(text_path) == text_path.read_text()
    with pytest.raises(DataNotFoundError, match="bible-kjv"):
        data.read_bible_text(text_path.parent / "missing.txt")


def test_bible_command_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv(data.BIBLE_ENV, raising=False)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(DataNotFoundError, match="apt-get install bible-kjv"):
        data.read_bible_text(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bible_command_output_is_cleaned_and_cached_only_in_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(data.BIBLE_ENV, raising=False)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=RAW_BIBLE * 40, stderr="")

    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/bible")
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    cache = tmp_path / "cache"
    text = data.read_bible_text(cache_dir=cache)
    assert "In the beginning" in text and "  1 " not in text
    assert calls == [list(data.BIBLE_COMMAND)] or calls == [data.BIBLE_COMMAND]
    assert (cache / "kjv-bible.txt").read_text() == text
    assert data.read_bible_text(cache_dir=cache) == text
    assert len(calls) == 1  # second read came from the cache


def test_encode_corpus_contiguous_splits():
    text = "abcdefghij" * 100
    corpus = data.encode_corpus(text, val_fraction=0.1, test_fraction=0.2)
    assert corpus.alphabet == "abcdefghij"
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (700, 100, 200)
    decoded = "".join(corpus.alphabet[i] for i in torch.cat([corpus.train, corpus.val, corpus["test"]]).tolist())
    assert decoded == text
    with pytest.raises(ValueError):
        data.encode_corpus("too short")


def test_digits_splits_are_disjoint_and_cover_the_data():
    splits = data.load_digits()
    sizes = [len(splits[s][0]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 359
    assert splits.train[0].shape[1] == 64 and 0 <= float(splits.train[0].min()) and float(splits.train[0].max()) <= 1
    rows = {tuple(r.tolist()) for s in ("train", "val", "test") for r in splits[s][0]}
    assert len(rows) > 1700  # (a few digits images are exact duplicates in the original data)
