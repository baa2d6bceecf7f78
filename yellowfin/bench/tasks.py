"""Benchmark tasks: each bundles a data set, a model, a loss, an evaluation and its step budgets.

    from yellowfin.bench.tasks import get_task, TASKS
    task = get_task("fmnist_resnet", data_dir="/path/to/idx")
    model = task.make_model(seed)
    batches = task.train_batches(seed)          # endless iterator
    loss = task.loss(model, next(batches))      # scalar, mean over batch (and sequence)
    task.evaluate(model, "val")                 # {"loss": ..., task.metric: ...}

A new task is a subclass of Task registered in TASKS; it declares its budgets and learning-rate grids here, so the
runner needs no per-task code.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from yellowfin.bench import data

Batch = Any


class Task(abc.ABC):
    """The contract every benchmark task implements (see docs/api-contract.md)."""

    name: str = ""
    metric: str = "loss"  # the headline evaluation metric, a key of evaluate()'s dict
    higher_is_better: bool = False
    default_steps: int = 1000
    quick_steps: int = 100
    # Option overrides for --quick runs (smaller evaluation subsets), applied on top of the user's options.
    quick_options: dict[str, Any] = {}
    # Learning-rate grids (log scale, >= 5 points) for the baselines that need tuning, searched on the val split.
    lr_grids: dict[str, tuple[float, ...]] = {}
    # Which of the command line's data options (data_dir, text_path, cache_dir) the constructor takes.
    data_options: tuple[str, ...] = ()

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abc.abstractmethod
    def make_model(self, seed: int) -> nn.Module:
        """A freshly initialised model (the same for the same seed)."""

    @abc.abstractmethod
    def train_batches(self, seed: int) -> Iterator[Batch]:
        """An endless iterator of training batches."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss, a mean over the batch (and sequence)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """The loss and the task's metric on the "val" or "test" split."""

    def load_data(self) -> None:
        """Load and check the task's data now, so that missing data (DataNotFoundError) or broken data
        (DataInvalidError) is reported before any training starts. Tasks that generate their data do nothing."""

    def exact_loss(self, model: nn.Module) -> float | None:
        """The full (noise-free) training objective, when it is cheap to compute exactly; None otherwise.
        When available the runner records it every step and the report compares optimizers on it."""
        return None

    def config(self) -> dict[str, Any]:
        """What identifies this task's setup in a results file."""
        return {"name": self.name, "metric": self.metric, **{k: _jsonable(v) for k, v in self.options.items()}}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _check_split(split: str) -> None:
    if split not in ("val", "test"):
        raise ValueError(f"evaluate() takes split 'val' or 'test', not {split!r}")


# ---------------------------------------------------------------------------------------------------------------
# Image classification (Fashion-MNIST ResNet, digits MLP)


class ClassificationTask(Task):
    """Shared machinery for in-memory classification data: shuffled epochs, chunked evaluation, accuracy."""

    metric = "accuracy"
    higher_is_better = True
    batch_size = 128
    eval_batch_size = 1000

    def __init__(self, batch_size: int | None = None, train_examples: int | None = None,
                 eval_examples: int | None = None, **options: Any) -> None:
        super().__init__(batch_size=batch_size or self.batch_size, train_examples=train_examples,
                         eval_examples=eval_examples, **options)
        self.batch_size = batch_size or self.batch_size
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self._splits: data.Splits | None = None

    @abc.abstractmethod
    def load_splits(self) -> data.Splits:
        """The train/val/test arrays, loaded from the task's data."""

    def load_data(self) -> None:
        self.splits  # noqa: B018 - the property loads and caches them

    @property
    def splits(self) -> data.Splits:
        if self._splits is None:  # lazily, so building a task (e.g. to list budgets) costs nothing
            self._splits = self.load_splits()
        return self._splits

    def train_batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.splits.train
        if self.train_examples is not None:
            x, y = x[: self.train_examples], y[: self.train_examples]
        generator = torch.Generator().manual_seed(seed)
        batch = min(self.batch_size, len(x))
        while True:  # endless shuffled epochs; the ragged tail of each epoch is dropped
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x) - batch + 1, batch):
                idx = order[start : start + batch]
                yield x[idx], y[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        _check_split(split)
        x, y = self.splits[split]
        if self.eval_examples is not None:
            x, y = x[: self.eval_examples], y[: self.eval_examples]
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        try:
            for start in range(0, len(x), self.eval_batch_size):
                logits = model(x[start : start + self.eval_batch_size])
                targets = y[start : start + self.eval_batch_size]
                total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
                correct += (logits.argmax(dim=1) == targets).sum().item()
        finally:
            model.train(was_training)
        return {"loss": total_loss / len(x), "accuracy": correct / len(x)}


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) for small images: 6n+2 layers, three stages of n blocks
    at 16/32/64 channels (times width), strides 1/2/2, global average pooling. n = 3 is ResNet-20."""

    def __init__(self, blocks_per_stage: int = 3, width: int = 16, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        layers, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out_channels = width * 2**stage
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(channels, out_channels, stride if block == 0 else 1))
                channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


class FashionMnistResNet(ClassificationTask):
    """ResNet-20-style network on Fashion-MNIST (28x28 greyscale, 10 classes), batch 128."""

    name = "fmnist_resnet"
    data_options = ("data_dir",)
    # ~0.25 s a step on 2 CPU cores: 24 runs of 300 steps (0.7 epoch) are ~35 minutes of the full suite.
    default_steps = 300
    quick_steps = 30
    quick_options = {"eval_examples": 1000}
    eval_examples_default = 2000  # first 2,000 of val (5,000) / test (10,000) images, to bound evaluation time
    lr_grids = {
        "sgd_momentum": (0.003, 0.01, 0.03, 0.1, 0.3),
        "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    }

    def __init__(self, data_dir: str | None = None, blocks_per_stage: int = 3, width: int = 16,
                 eval_examples: int | None = eval_examples_default, **options: Any) -> None:
        super().__init__(data_dir=data_dir, blocks_per_stage=blocks_per_stage, width=width,
                         eval_examples=eval_examples, **options)
        self.data_dir = data_dir
        self.blocks_per_stage = blocks_per_stage
        self.width = width

    def load_splits(self) -> data.Splits:
        return data.load_fashion_mnist(self.data_dir)

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return ResNet(self.blocks_per_stage, self.width, in_channels=1, num_classes=10)


class DigitsMLP(ClassificationTask):
    """A one-hidden-layer MLP on scikit-learn's 8x8 digits: seconds per run, for smoke tests."""

    name = "digits_mlp"
    batch_size = 64
    default_steps = 600
    quick_steps = 150
    lr_grids = {
        "sgd_momentum": (0.003, 0.01, 0.03, 0.1, 0.3),
        "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    }

    def __init__(self, hidden: int = 128, **options: Any) -> None:
        super().__init__(hidden=hidden, **options)
        self.hidden = hidden

    def load_splits(self) -> data.Splits:
        return data.load_digits()

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))


class FashionMnistResNet8(FashionMnistResNet):
    """ResNet-8 (one basic block per stage, 8/16/32 channels) on the first 12,800 Fashion-MNIST training images,
    so that its budget is 3 epochs: a fraction of an epoch would reward whoever has no warm-up."""

    name = "fmnist_resnet8"
    train_examples_default = 12_800
    # 3 epochs of 100 batches of 128. ~0.13 s a step with one torch thread on the shared 2-core machine (real
    # data, YellowFin; momentum SGD 0.12 s): a 300-step run with its evaluation is ~40 s, the suite's 25 runs ~17 min.
    default_steps = 300
    quick_steps = 30

    def __init__(self, data_dir: str | None = None, blocks_per_stage: int = 1, width: int = 8,
                 train_examples: int | None = train_examples_default, **options: Any) -> None:
        super().__init__(data_dir=data_dir, blocks_per_stage=blocks_per_stage, width=width,
                         train_examples=train_examples, **options)


# ---------------------------------------------------------------------------------------------------------------
# Flat images: multinomial logistic regression (convex) and a deep autoencoder


FLAT_IMAGE_FEATURES = {"fashion_mnist": 28 * 28, "digits": 8 * 8}


class FlatImageTask(ClassificationTask):
    """In-memory images as flat feature vectors, from Fashion-MNIST (the default; skipped with an install hint
    when its files are missing, like fmnist_resnet) or scikit-learn's digits (dataset="digits", needs nothing)."""

    data_options = ("data_dir",)

    def __init__(self, dataset: str = "fashion_mnist", data_dir: str | None = None, **options: Any) -> None:
        if dataset not in FLAT_IMAGE_FEATURES:
            raise ValueError(f"dataset must be one of {', '.join(FLAT_IMAGE_FEATURES)}, got {dataset!r}")
        super().__init__(dataset=dataset, data_dir=data_dir, **options)
        self.dataset, self.data_dir = dataset, data_dir

    @property
    def features(self) -> int:
        return FLAT_IMAGE_FEATURES[self.dataset]

    def load_splits(self) -> data.Splits:
        if self.dataset == "digits":
            return data.load_digits()
        images = data.load_fashion_mnist(self.data_dir)
        return data.Splits(**{split: (images[split][0].flatten(1), images[split][1])
                              for split in ("train", "val", "test")})


class LogisticRegression(FlatImageTask):
    """Multinomial logistic regression (one linear layer, softmax cross entropy) on the normalised pixels: a convex
    problem, where the optimum's loss does not depend on the optimizer and only speed separates them."""

    name = "logreg"
    # 2000 steps of 128 (4.7 epochs of Fashion-MNIST). ~0.004 s a step for YellowFin, 0.0013 s for momentum SGD,
    # with one torch thread on the shared 2-core machine: ~8 s a run, ~3 minutes for the full suite's runs.
    default_steps = 2000
    quick_steps = 200
    lr_grids = {
        "sgd_momentum": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    }

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(self.features, 10)


class DeepAutoencoder(FlatImageTask):
    """A deep fully connected autoencoder in the style of Hinton and Salakhutdinov (2006), scaled to a CPU:
    features-256-128-64-16 and back, tanh units, a linear 16-unit code, sigmoid outputs; the loss is the binary
    cross entropy of the reconstructed pixel intensities in [0, 1], a mean over pixels and batch. Deep, narrow,
    saturating nets like this one are where Adam is known to beat momentum SGD. The metric is the per-pixel
    squared reconstruction error."""

    name = "autoencoder"
    metric = "mse"
    higher_is_better = False
    layers = (256, 128, 64, 16)
    # 2000 steps of 128 (4.7 epochs of Fashion-MNIST). ~0.024 s a step for YellowFin, 0.016 s for momentum SGD,
    # with one torch thread on the shared 2-core machine: ~45 s a run, ~20 minutes for the full suite's runs.
    default_steps = 2000
    quick_steps = 200
    lr_grids = {
        "sgd_momentum": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    }

    def load_splits(self) -> data.Splits:
        splits = super().load_splits()
        if self.dataset == "fashion_mnist":  # back from normalised values to intensities, the targets of the loss
            splits = data.Splits(**{split: ((splits[split][0] * data.FASHION_MNIST_STD + data.FASHION_MNIST_MEAN)
                                            .clamp_(0.0, 1.0), splits[split][1]) for split in ("train", "val", "test")})
        return splits

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        widths = (self.features, *self.layers)
        encoder = [layer for a, b in zip(widths[:-2], widths[1:-1]) for layer in (nn.Linear(a, b), nn.Tanh())]
        encoder.append(nn.Linear(widths[-2], widths[-1]))  # the code is linear
        reverse = widths[::-1]
        decoder = [layer for a, b in zip(reverse[:-2], reverse[1:-1]) for layer in (nn.Linear(a, b), nn.Tanh())]
        decoder.append(nn.Linear(reverse[-2], reverse[-1]))  # logits of the pixel intensities
        return nn.Sequential(*encoder, *decoder)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pixels, _ = batch
        return F.binary_cross_entropy_with_logits(model(pixels), pixels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        _check_split(split)
        x, _ = self.splits[split]
        if self.eval_examples is not None:
            x = x[: self.eval_examples]
        was_training = model.training
        model.eval()
        total_loss, total_squared = 0.0, 0.0
        try:
            for start in range(0, len(x), self.eval_batch_size):
                pixels = x[start : start + self.eval_batch_size]
                logits = model(pixels)
                total_loss += F.binary_cross_entropy_with_logits(logits, pixels, reduction="sum").item()
                total_squared += (torch.sigmoid(logits) - pixels).square().sum().item()
        finally:
            model.train(was_training)
        count = x.numel()
        return {"loss": total_loss / count, "mse": total_squared / count}


# ---------------------------------------------------------------------------------------------------------------
# Character-level language model on the King James Bible


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


class BibleCharLSTM(Task):
    """2-layer character LSTM language model on the King James Bible; loss is the mean cross entropy over batch
    and sequence, the metric is perplexity per character on held-out books."""

    name = "char_lstm"
    data_options = ("text_path", "cache_dir")
    metric = "perplexity"
    higher_is_better = False
    # ~0.03 s a step on 2 CPU cores: 24 runs of 1500 steps are ~20 minutes of the full suite.
    default_steps = 1500
    quick_steps = 40
    quick_options = {"eval_chars": 16384}
    lr_grids = {
        "sgd_momentum": (0.03, 0.1, 0.3, 1.0, 3.0),
        "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    }

    def __init__(self, text_path: str | None = None, cache_dir: str | None = None, hidden: int = 128,
                 layers: int = 2, seq_len: int = 64, batch_size: int = 32, eval_chars: int | None = 65536,
                 **options: Any) -> None:
        super().__init__(text_path=text_path, cache_dir=cache_dir, hidden=hidden, layers=layers, seq_len=seq_len,
                         batch_size=batch_size, eval_chars=eval_chars, **options)
        self.text_path, self.cache_dir = text_path, cache_dir
        self.hidden, self.layers, self.seq_len, self.batch_size = hidden, layers, seq_len, batch_size
        self.eval_chars = eval_chars
        self._corpus: data.CharCorpus | None = None

    @property
    def corpus(self) -> data.CharCorpus:
        if self._corpus is None:
            self._corpus = data.load_bible(self.text_path, self.cache_dir)
        return self._corpus

    def load_data(self) -> None:
        corpus = self.corpus
        # Every split must hold more than one sequence and its shifted target, or training or evaluation fails.
        needed = self.seq_len + 2
        for split in ("train", "val", "test"):
            if len(corpus[split]) < needed:
                source = self.text_path or "the King James Bible text"
                raise data.DataInvalidError(
                    f"{source}: too short for seq_len {self.seq_len}: the {split} split has {len(corpus[split])} "
                    f"characters, at least {needed} are needed (a 5% split: about {20 * needed} characters "
                    "of text in all)")

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharLSTM(len(self.corpus.alphabet), self.hidden, self.layers)

    def train_batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = self.corpus.train
        span = self.seq_len + 1
        if len(stream) <= span:
            raise ValueError(f"training text ({len(stream)} chars) shorter than one sequence ({span})")
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.arange(span)
        while True:  # random windows of the training books
            starts = torch.randint(0, len(stream) - span + 1, (self.batch_size, 1), generator=generator)
            windows = stream[starts + offsets]
            yield windows[:, :-1], windows[:, 1:]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        _check_split(split)
        stream = self.corpus[split]
        if self.eval_chars is not None:
            stream = stream[: self.eval_chars + 1]
        n_seq = (len(stream) - 1) // self.seq_len
        if n_seq == 0:
            raise ValueError(f"{split} text too short for one sequence of {self.seq_len}")
        inputs = stream[: n_seq * self.seq_len].view(n_seq, self.seq_len)
        targets = stream[1 : n_seq * self.seq_len + 1].view(n_seq, self.seq_len)
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            for start in range(0, n_seq, 256):
                logits = model(inputs[start : start + 256])
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         targets[start : start + 256].reshape(-1), reduction="sum").item()
        finally:
            model.train(was_training)
        loss = total / (n_seq * self.seq_len)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ---------------------------------------------------------------------------------------------------------------
# Noisy quadratic with a known optimum


class QuadraticPoint(nn.Module):
    """The model of the quadratic task: just the point x."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(initial.clone())


class NoisyQuadratic(Task):
    """f(x) = E_c [ 1/2 (x - c)^T H (x - c) ],  c ~ N(x*, noise^2 I),  H = Q diag(lambda) Q^T.

    lambda: 90 eigenvalues uniform in (0, 1) and 10 uniform in (30, 60), Q a random rotation; the problem (H, x*)
    is drawn from problem_seed, the start point and the data noise from the run's seed. A batch is batch_size
    samples of c; the loss is the mean over them. evaluate() reports the exact excess loss
    f(x) - f(x*) = 1/2 (x - x*)^T H (x - x*) as "loss" and as the metric "excess_loss", plus the distance
    ||x - x*|| (val and test are the same: the optimum is known)."""

    name = "quadratic"
    metric = "excess_loss"
    higher_is_better = False
    default_steps = 3000
    quick_steps = 300
    lr_grids = {
        "sgd_momentum": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        "adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    }

    def __init__(self, dim: int = 100, n_large: int = 10, small_range: tuple[float, float] = (0.0, 1.0),
                 large_range: tuple[float, float] = (30.0, 60.0), noise: float = 1.0, batch_size: int = 16,
                 init_scale: float = 1.0, problem_seed: int = 0, **options: Any) -> None:
        super().__init__(dim=dim, n_large=n_large, small_range=small_range, large_range=large_range, noise=noise,
                         batch_size=batch_size, init_scale=init_scale, problem_seed=problem_seed, **options)
        if not 0 < n_large < dim:
            raise ValueError("need 0 < n_large < dim")
        self.dim, self.noise, self.batch_size, self.init_scale = dim, noise, batch_size, init_scale
        g = torch.Generator().manual_seed(problem_seed)
        lo, hi = small_range
        # Open interval: keep the small eigenvalues strictly positive so x* is the unique optimum.
        small = lo + (hi - lo) * (0.001 + 0.998 * torch.rand(dim - n_large, generator=g, dtype=torch.float64))
        large = large_range[0] + (large_range[1] - large_range[0]) * torch.rand(n_large, generator=g,
                                                                                dtype=torch.float64)
        self.eigenvalues = torch.sort(torch.cat([small, large])).values
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.hessian = (rotation * self.eigenvalues) @ rotation.T
        self.optimum = torch.randn(dim, generator=g, dtype=torch.float64)
        self._hessian32 = self.hessian.float()

    def make_model(self, seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        start = self.optimum + self.init_scale * torch.randn(self.dim, generator=g, dtype=torch.float64)
        return QuadraticPoint(start.float())

    def train_batches(self, seed: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + seed)  # offset: data noise independent of the start point
        centre = self.optimum.float()
        while True:
            yield centre + self.noise * torch.randn(self.batch_size, self.dim, generator=g)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        diff = model.x.unsqueeze(0) - batch
        return 0.5 * ((diff @ self._hessian32) * diff).sum(dim=1).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        _check_split(split)
        excess = self.exact_loss(model)
        distance = float((model.x.detach().double() - self.optimum).norm())
        return {"loss": excess, "excess_loss": excess, "distance": distance}

    @torch.no_grad()
    def exact_loss(self, model: nn.Module) -> float:
        """f(x) - f(x*): the expected loss minus its irreducible noise floor noise^2 tr(H) / 2."""
        diff = model.x.detach().double() - self.optimum
        return float(0.5 * diff @ self.hessian @ diff)


TASKS: dict[str, Callable[..., Task]] = {
    "quadratic": NoisyQuadratic,
    "digits_mlp": DigitsMLP,
    "fmnist_resnet": FashionMnistResNet,
    "char_lstm": BibleCharLSTM,
    "logreg": LogisticRegression,
    "autoencoder": DeepAutoencoder,
    "fmnist_resnet8": FashionMnistResNet8,
}

# The order of the tuner research's tables (docs/tuner.md): from the smallest problem to the largest network.
TABLE_ORDER = ("quadratic", "digits_mlp", "logreg", "autoencoder", "fmnist_resnet8", "char_lstm", "fmnist_resnet")


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name; options go to its constructor (e.g. data_dir, train_examples, text_path)."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
    return factory(**options)
