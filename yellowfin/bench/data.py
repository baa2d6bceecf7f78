"""Data loaders for the benchmark tasks: Fashion-MNIST (IDX files), the King James Bible, scikit-learn digits.

Every loader returns plain tensors split into train / val / test. The validation split is carved out of the
training data with a fixed permutation, so learning-rate grids never see the test set. Nothing is downloaded and
nothing is cached outside a directory the caller chooses.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from yellowfin.bench.errors import DataInvalidError, NotWritableError
from yellowfin.files import atomic_write

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "YELLOWFIN_FASHION_MNIST_DIR"
FASHION_MNIST_HINT = (
    "Fashion-MNIST IDX files not found. Install them with `sudo apt-get install dataset-fashion-mnist` "
    f"(files land in {FASHION_MNIST_DIRS[0]}), or point --data-dir / ${FASHION_MNIST_ENV} at a directory holding "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
    "(optionally .gz)."
)
BIBLE_ENV = "YELLOWFIN_BIBLE_TEXT"
BIBLE_HINT = (
    "King James Bible text not found. Install it with `sudo apt-get install bible-kjv` (which provides the "
    f"`bible` command), or pass a plain-text file via --text-path / ${BIBLE_ENV}."
)
# The whole book, Genesis to Revelation, one verse per line (-l sets the page length so nothing is paged).
BIBLE_COMMAND = ("bible", "-l", "100000", "gen1:1-rev22:21")

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Fraction of the training set held out for validation (learning-rate grids). Fixed so results are comparable.
VAL_FRACTION = 1 / 12
SPLIT_SEED = 1234


class DataNotFoundError(FileNotFoundError):
    """A benchmark data set is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Splits:
    """Inputs and targets per split; each value is a (inputs, targets) pair of tensors."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("train", "val", "test"):
            raise KeyError(f"unknown split {split!r}; expected train, val or test")
        return getattr(self, split)


# ---------------------------------------------------------------------------------------------------------------
# IDX (the MNIST file format)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a numpy array of its declared type and shape.

    Raises DataInvalidError, naming the file, when it cannot be read or is not a complete IDX file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataInvalidError(f"{path}: not a valid gzip file ({exc})") from None
    except OSError as exc:
        raise DataInvalidError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataInvalidError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        raise DataInvalidError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataInvalidError(f"{path}: truncated IDX header ({ndim} dimensions declared, {len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(IDX_DTYPES[type_code])
    count = math.prod(shape)  # exact integer: a garbage header must not overflow into a plausible size
    if len(raw) - offset < count * dtype.itemsize:
        raise DataInvalidError(f"{path}: truncated IDX file (header says shape {shape})")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when the name ends in .gz). Used to make test fixtures."""
    array = np.asarray(array)
    code = _IDX_CODE_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(f"dtype {array.dtype} cannot be stored in IDX")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array.astype(array.dtype.newbyteorder(">"))).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


_IDX_CODE_BY_KIND = {(np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in IDX_DTYPES.items()}


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the Fashion-MNIST IDX files: data_dir, else $YELLOWFIN_FASHION_MNIST_DIR, else the
    Debian package's location. Raises DataNotFoundError (with install instructions) when none has the files."""
    candidates = [data_dir] if data_dir is not None else [os.environ.get(FASHION_MNIST_ENV), *FASHION_MNIST_DIRS]
    for candidate in candidates:
        if candidate and all(_find_idx(Path(candidate), s) for s in _FMNIST_STEMS.values()):
            return Path(candidate)
    where = f" in {data_dir}" if data_dir is not None else ""
    raise DataNotFoundError(FASHION_MNIST_HINT.replace("not found", f"not found{where}", 1))


_FMNIST_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


FASHION_MNIST_IMAGE_SIZE = (28, 28)
# Pixel mean and standard deviation (of intensities in [0, 1]) that the loaded images are normalised with.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.286, 0.353


def _check_fashion_mnist_part(images_path: Path, images: np.ndarray, labels_path: Path, labels: np.ndarray) -> None:
    """Refuse files that would only fail (or silently mislead) during training: wrong shapes or types, labels
    outside the classes, image and label counts that disagree."""
    size = FASHION_MNIST_IMAGE_SIZE
    if images.ndim != 3 or images.shape[1:] != size or images.dtype != np.uint8:
        raise DataInvalidError(f"{images_path}: expected unsigned-byte images of shape (N, {size[0]}, {size[1]}), "
                               f"found {images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataInvalidError(f"{labels_path}: expected a 1-D array of integer labels, "
                               f"found {labels.dtype} of shape {labels.shape}")
    n_classes = len(FASHION_MNIST_CLASSES)
    outside = labels[(labels < 0) | (labels >= n_classes)]
    if outside.size:
        raise DataInvalidError(f"{labels_path}: {outside.size} labels outside 0..{n_classes - 1} "
                               f"(Fashion-MNIST has {n_classes} classes), e.g. {int(outside[0])}")
    if len(images) != len(labels):
        raise DataInvalidError(f"{labels_path}: {len(labels)} labels for the {len(images)} images in "
                               f"{images_path.name}")
    minimum = 2  # the training part must leave at least one image beside the validation hold-out
    if len(images) < minimum:
        raise DataInvalidError(f"{images_path}: {len(images)} images; at least {minimum} are needed")


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(directory: str) -> Splits:
    d = Path(directory)
    paths = {key: _find_idx(d, stem) for key, stem in _FMNIST_STEMS.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for part in ("train", "test"):
        _check_fashion_mnist_part(paths[f"{part}_images"], arrays[f"{part}_images"],
                                  paths[f"{part}_labels"], arrays[f"{part}_labels"])

    def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Scale to [0, 1] and centre with the data set's usual statistics, so BN-free layers start sensibly too.
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, torch.from_numpy(labels.astype(np.int64))

    train_x, train_y = to_tensors(arrays["train_images"], arrays["train_labels"])
    n_val = max(1, int(round(len(train_x) * VAL_FRACTION)))
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Splits(
        train=(train_x[train_idx], train_y[train_idx]),
        val=(train_x[val_idx], train_y[val_idx]),
        test=to_tensors(arrays["test_images"], arrays["test_labels"]),
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Splits:
    """Fashion-MNIST as normalised float images (N, 1, 28, 28) and int64 labels, split train/val/test.

    val is 1/12 of the official training set (5,000 of 60,000 images), test the official test set."""
    return _load_fashion_mnist_cached(str(fashion_mnist_dir(data_dir).resolve()))


# ---------------------------------------------------------------------------------------------------------------
# The King James Bible

_VERSE_NUMBER = re.compile(r"^[ \t]+\d+[ \t]+", re.MULTILINE)


def clean_bible_text(raw: str) -> str:
    """Drop the verse numbers the `bible` command prints, keep book/chapter headings and the prose."""
    text = _VERSE_NUMBER.sub("", raw)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_bible_text(text_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """The King James Bible as one string.

    Order of sources: text_path (any plain-text file, used as is), $YELLOWFIN_BIBLE_TEXT, a copy in cache_dir
    (when given), the `bible` command of the Debian package bible-kjv. Only cache_dir is ever written to."""
    text_path = text_path or os.environ.get(BIBLE_ENV)
    if text_path:
        path = Path(text_path)
        if not path.is_file():
            raise DataNotFoundError(f"text file {path} does not exist. " + BIBLE_HINT)
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataInvalidError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    cached = Path(cache_dir) / "kjv-bible.txt" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return cached.read_text(encoding="utf-8")
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise DataNotFoundError(BIBLE_HINT)
    result = subprocess.run(BIBLE_COMMAND, capture_output=True, text=True, errors="replace", check=False)
    if result.returncode != 0 or len(result.stdout) < 1000:
        raise DataNotFoundError(f"`{' '.join(BIBLE_COMMAND)}` failed ({result.stderr.strip()[:200]}). " + BIBLE_HINT)
    text = clean_bible_text(result.stdout)
    if cached is not None:
        try:
            atomic_write(cached, lambda f: f.write(text), text=True)
        except OSError as exc:
            raise NotWritableError(f"cannot cache the text in {cached.parent}: {exc.strerror or exc}") from None
    return text


@dataclass(frozen=True)
class CharCorpus:
    """A character-level corpus: the alphabet and the encoded train / val / test streams (1-D int64 tensors)."""

    alphabet: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def __getitem__(self, split: str) -> torch.Tensor:
        if split not in ("train", "val", "test"):
            raise KeyError(f"unknown split {split!r}; expected train, val or test")
        return getattr(self, split)


def encode_corpus(text: str, val_fraction: float = 0.05, test_fraction: float = 0.05) -> CharCorpus:
    """Encode characters as integers and cut the text into contiguous train / val / test pieces (in that order,
    so the model is tested on books it did not train on)."""
    if len(text) < 100:
        raise ValueError(f"corpus too short ({len(text)} characters)")
    alphabet = "".join(sorted(set(text)))
    lookup = np.zeros(max(map(ord, alphabet)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in alphabet]] = np.arange(len(alphabet))
    codes = torch.from_numpy(lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)])
    n = len(codes)
    n_test, n_val = int(n * test_fraction), int(n * val_fraction)
    n_train = n - n_val - n_test
    return CharCorpus(alphabet, codes[:n_train], codes[n_train : n_train + n_val], codes[n_train + n_val :])


@functools.lru_cache(maxsize=4)
def _load_bible_cached(text_path: str | None, cache_dir: str | None) -> CharCorpus:
    text = read_bible_text(text_path, cache_dir)
    try:
        return encode_corpus(text)
    except ValueError as exc:
        raise DataInvalidError(f"{text_path or 'the King James Bible text'}: {exc}") from None


def load_bible(text_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> CharCorpus:
    """The King James Bible as a character corpus (90% train, 5% val, 5% test, contiguous)."""
    text_path = text_path or os.environ.get(BIBLE_ENV)
    return _load_bible_cached(str(text_path) if text_path else None, str(cache_dir) if cache_dir else None)


# ---------------------------------------------------------------------------------------------------------------
# scikit-learn digits (bundled with scikit-learn: the fallback real data set that needs no system package)


@functools.lru_cache(maxsize=1)
def load_digits() -> Splits:
    """scikit-learn's 8x8 digits (1,797 images) as flat float features in [0, 1], split 60/20/20."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataNotFoundError(
            "scikit-learn is needed for the digits task: pip install 'yellowfin-optim[bench]'"
        ) from exc
    bunch = sklearn_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = n_test = len(x) // 5
    test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return Splits(train=(x[train_idx], y[train_idx]), val=(x[val_idx], y[val_idx]), test=(x[test_idx], y[test_idx]))
