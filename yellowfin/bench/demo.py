"""`yellowfin demo`: YellowFin at its defaults next to Adam at its defaults, on the same model, initialisation and
batches, for a few minutes of CPU time; then a summary table and a figure of the loss and the tuned mu and alpha.

Neither optimizer is tuned: that is the situation YellowFin is for. (The benchmark suite compares against tuned
baselines.)"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from yellowfin.bench import metrics
from yellowfin.bench import results as results_io
from yellowfin.bench.data import DataNotFoundError
from yellowfin.bench.runner import refresh_batchnorm
from yellowfin.bench.tasks import Task, get_task

ADAM_DEFAULT_LR = 1e-3
TRAIN_SHARE = 0.85  # of the time budget; the rest is evaluation and plotting


@dataclass
class DemoRun:
    name: str
    optimizer: torch.optim.Optimizer
    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    mu: list[float] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    seconds: float = 0.0
    test: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoResult:
    task: str
    fallback: bool
    runs: list[DemoRun]
    figure: Path
    summary_path: Path
    table: str


def choose_task(data_dir: str | None, say: Callable[[str], None]) -> tuple[Task, bool]:
    """A small ResNet (ResNet-8) on Fashion-MNIST, or an MLP on scikit-learn digits when the data is missing."""
    task = get_task("fmnist_resnet", data_dir=data_dir, blocks_per_stage=1, eval_examples=2000)
    try:
        task.splits  # noqa: B018 - loads the data now, so a missing data set is reported before training
        return task, False
    except DataNotFoundError as exc:
        say(str(exc))
        say("Falling back to scikit-learn's digits data set (8x8 images, an MLP) for this demo.")
        return get_task("digits_mlp"), True


def run_demo(minutes: float = 3.0, data_dir: str | None = None, out_dir: str | Path = "yellowfin-demo",
             seed: int = 0, max_steps: int | None = None, progress: bool = True,
             say: Callable[[str], None] = print) -> DemoResult:
    from yellowfin import YellowFin

    out_dir = results_io.check_writable(out_dir)  # before minutes of training, not after
    task, fallback = choose_task(data_dir, say)
    say(f"Task: {task.name} ({'fallback' if fallback else 'Fashion-MNIST, ResNet-8'}); "
        f"{minutes:g} minutes of training, {torch.get_num_threads()} torch threads.")
    yf_model, adam_model = task.make_model(seed), task.make_model(seed)  # same initial weights
    runs = [
        DemoRun("YellowFin (defaults)", YellowFin(yf_model.parameters()), yf_model),
        DemoRun(f"Adam (default lr {ADAM_DEFAULT_LR:g})", torch.optim.Adam(adam_model.parameters(),
                                                                             lr=ADAM_DEFAULT_LR), adam_model),
    ]
    bars = _bars(runs, max_steps, progress)
    batches = task.train_batches(seed)
    deadline = time.perf_counter() + TRAIN_SHARE * minutes * 60
    step = 0
    try:
        while (max_steps is None or step < max_steps) and time.perf_counter() < deadline:
            batch = next(batches)  # both optimizers see the same batch
            for run, bar in zip(runs, bars):
                started = time.perf_counter()
                run.optimizer.zero_grad(set_to_none=True)
                loss = task.loss(run.model, batch)
                loss.backward()
                run.optimizer.step()
                run.losses.append(loss.item())
                run.seconds += time.perf_counter() - started
                if isinstance(run.optimizer, YellowFin):
                    stats = run.optimizer.stats()
                    run.mu.append(stats.get("applied_momentum", stats["mu"]))
                    run.alpha.append(stats["alpha"])
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        postfix = {"loss": f"{run.losses[-1]:.3f}"}
                        if run.mu:
                            postfix.update(mu=f"{run.mu[-1]:.3f}", alpha=f"{run.alpha[-1]:.3g}")
                        bar.set_postfix(postfix, refresh=False)
            step += 1
    except KeyboardInterrupt:
        say("Interrupted: summarising what ran so far.")
    finally:
        for bar in bars:
            if bar is not None:
                bar.close()
    for run in runs:
        run.test = _evaluate_handed_out(task, run, seed) if run.losses else {}
    table = summary_table(task, runs)
    figure = plot_demo(task, runs, out_dir / "demo.png", fallback)
    summary_path = out_dir / "demo.json"
    summary_path.write_text(json.dumps(_summary(task, runs, fallback), indent=1), encoding="utf-8")
    return DemoResult(task.name, fallback, runs, figure, summary_path, table)


def _evaluate_handed_out(task: Task, run: DemoRun, seed: int) -> dict[str, float]:
    """The test metrics at the point the optimizer hands out: YellowFin's average where it keeps one (its default),
    a copy with its batch-norm statistics measured again (docs/algorithm.md §10), else the parameters."""
    keeps_average = getattr(run.optimizer, "keeps_average", None)
    if keeps_average is not None and keeps_average():
        with run.optimizer.averaged():
            average = copy.deepcopy(run.model)
        refresh_batchnorm(task, average, seed)
        return task.evaluate(average, "test")
    return task.evaluate(run.model, "test")


def _bars(runs: list[DemoRun], total: int | None, enabled: bool) -> list[Any]:
    if not enabled:
        return [None] * len(runs)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return [None] * len(runs)
    width = max(len(r.name) for r in runs)
    return [tqdm(total=total, desc=r.name.ljust(width), unit="step", position=i, mininterval=0.5)
            for i, r in enumerate(runs)]


def _smoothed_final(losses: list[float]) -> float:
    return float(metrics.smooth(losses)[-1]) if losses else math.nan


def summary_table(task: Task, runs: list[DemoRun]) -> str:
    metric = task.metric
    rows = [("optimizer", "steps", "train loss (smoothed, last)", f"test {metric}", "train seconds")]
    for run in runs:
        value = run.test.get(metric)
        rows.append((run.name, str(len(run.losses)), f"{_smoothed_final(run.losses):.4f}",
                     "n/a" if value is None else f"{value:.4f}", f"{run.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary(task: Task, runs: list[DemoRun], fallback: bool) -> dict[str, Any]:
    return {
        "task": task.config(),
        "fallback": fallback,
        "runs": [{"optimizer": r.name, "steps": len(r.losses), "train_seconds": r.seconds, "test": r.test,
                  "final_smoothed_loss": _smoothed_final(r.losses), "loss": r.losses, "mu": r.mu, "alpha": r.alpha}
                 for r in runs],
    }


def plot_demo(task: Task, runs: list[DemoRun], path: Path, fallback: bool) -> Path:
    from yellowfin.bench.report import pyplot, save_figure  # (matplotlib only when a figure is drawn)

    plt = pyplot()
    fig, (ax_loss, ax_mu, ax_alpha) = plt.subplots(1, 3, figsize=(13, 3.8))
    for run, color in zip(runs, ("goldenrod", "C0")):
        if run.losses:
            steps = np.arange(1, len(run.losses) + 1)
            ax_loss.plot(steps, run.losses, color=color, alpha=0.25, lw=0.6)
            ax_loss.plot(steps, metrics.smooth(run.losses), color=color, lw=1.8, label=run.name)
        if run.mu:
            steps = np.arange(1, len(run.mu) + 1)
            ax_mu.plot(steps, run.mu, color=color)
            ax_alpha.plot(steps, run.alpha, color=color, label="alpha")
            effective = np.asarray(run.alpha) / np.maximum(1e-12, 1 - np.asarray(run.mu))
            ax_alpha.plot(steps, effective, color=color, ls="--", label="alpha / (1 - mu)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss (same batches)")
    ax_loss.legend(fontsize=8)
    ax_mu.set_title("YellowFin's tuned momentum mu")
    ax_mu.set_ylim(0, 1)
    ax_alpha.set_title("YellowFin's tuned learning rate")
    ax_alpha.set_yscale("log")
    ax_alpha.legend(fontsize=8)
    for ax in (ax_loss, ax_mu, ax_alpha):
        ax.set_xlabel("iteration")
    name = "scikit-learn digits, MLP (fallback)" if fallback else "Fashion-MNIST, ResNet-8"
    fig.suptitle(f"yellowfin demo: {name}")
    return save_figure(fig, path)
