"""Running benchmarks: one training run (train_run), and a whole suite with learning-rate grids, seeds and the
YellowFin-step control (run_suite). Every finished run is written to its own results file; runs whose file
already exists are skipped, so rerunning an interrupted command resumes it."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from yellowfin.bench import results as results_io
from yellowfin.bench.data import DataNotFoundError
from yellowfin.bench.optimizers import (CONTROL, TUNED, OptimizerSpec, get_optimizer_spec, resolve_optimizers,
                                        set_train_mode)
from yellowfin.bench.tasks import Task, get_task

DEFAULT_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
# Schedule-Free and YellowFin's average evaluate at an averaged point, whose batch-norm statistics were never
# measured: Schedule-Free's authors, and docs/algorithm.md §10, recommend refreshing them with a few training batches
# before evaluating.
BATCHNORM_REFRESH_BATCHES = 20
# YellowFin's measurements behind each (mu, alpha), kept in the trace to explain its choices.
TUNER_ESTIMATES = ("h_min", "h_max", "grad_var", "dist")


def environment() -> dict[str, Any]:
    """Versions and machine, stored in every results file."""
    packages = {}
    for name in ("yellowfin-optim", "torch", "numpy", "schedulefree", "prodigyopt", "dadaptation", "dog-optimizer"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": platform.python_version(),
        "packages": packages,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def refresh_batchnorm(task: Task, model: nn.Module, seed: int) -> None:
    """Measure a model's batch-norm statistics again, on training batches of a stream apart from the run's, for a
    point whose weights never produced them (an average); a model without batch norm is left alone."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    batches = task.train_batches(seed + 7919)
    model.train()
    with torch.no_grad():
        for _ in range(BATCHNORM_REFRESH_BATCHES):
            task.loss(model, next(batches))


def train_run(task: Task, spec: OptimizerSpec, seed: int, steps: int, lr: float | None = None,
              lr_schedule: Sequence[float] | None = None, progress: Callable[[int, float], None] | None = None,
              ) -> dict[str, Any]:
    """Train task's model with one optimizer for `steps` steps and evaluate it on val and test.

    lr_schedule (the control run) sets every group's learning rate before each step. progress(step, loss) is
    called after every step. Returns the record that goes into a results file."""
    torch.manual_seed(seed)
    model = task.make_model(seed)
    model.train()
    optimizer = spec.build(model.parameters(), lr)
    set_train_mode(spec, optimizer, True)
    averager = spec.averager(model, optimizer) if spec.averager is not None else None
    # The point the optimizer hands out: the average where averaging is part of its usage, else the model.
    evaluated = averager.averaged_model if averager is not None else model
    batches = task.train_batches(seed)
    tracks_tuner = spec.records_tuner_trace
    tracks_exact = task.exact_loss(model) is not None
    exact: list[float | None] = []
    losses: list[float | None] = []
    wall: list[float] = []
    trace_keys = ("mu", "lr", "applied_momentum", "effective_lr") + TUNER_ESTIMATES
    trace: dict[str, list[float | None]] = {key: [] for key in trace_keys}
    diverged = False
    bookkeeping = 0.0  # time spent recording (exact loss, tuner stats), kept out of the wall-time trace
    start = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        if lr_schedule is not None:
            step_size = lr_schedule[min(step, len(lr_schedule) - 1)]
            for group in optimizer.param_groups:
                group["lr"] = step_size
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        if averager is not None:
            averager.step()
        value = loss.item()
        wall.append(round(time.perf_counter() - start - bookkeeping, 4))
        losses.append(results_io.finite_or_none(value))
        recording = time.perf_counter()
        if tracks_exact:
            exact.append(results_io.finite_or_none(task.exact_loss(evaluated)))  # after the step, at the new point
        if tracks_tuner:
            stats = optimizer.stats(0)  # the first tuner (the only one unless per_group_tuning)
            applied = stats.get("applied_momentum", stats["mu"])
            factor = optimizer.param_groups[0]["lr"]
            trace["mu"].append(stats["mu"])
            trace["lr"].append(stats["alpha"])  # (results files name the tuned alpha "lr")
            trace["applied_momentum"].append(applied)
            # The step size plain SGD needs to move as far per step as momentum does in steady state.
            trace["effective_lr"].append(factor * stats["alpha"] / max(1.0 - applied, 1e-12))
            for key in TUNER_ESTIMATES:
                trace[key].append(results_io.finite_or_none(stats.get(key, math.nan)))
        bookkeeping += time.perf_counter() - recording
        if progress is not None:
            progress(step + 1, value)
        if not math.isfinite(value):
            diverged = True
            break
    train_seconds = time.perf_counter() - start - bookkeeping

    evaluation: dict[str, Any] = {}
    eval_start = time.perf_counter()
    if not diverged:
        set_train_mode(spec, optimizer, False)
        if spec.needs_mode_switch or getattr(averager, "refreshes_batchnorm", False):
            refresh_batchnorm(task, evaluated, seed)
        evaluation = {split: task.evaluate(evaluated, split) for split in ("val", "test")}
        if any(not math.isfinite(v) for split in evaluation.values() for v in split.values()):
            diverged = True
            evaluation = {s: {k: results_io.finite_or_none(v) for k, v in m.items()} for s, m in evaluation.items()}
    record = {
        "task": task.config(),
        "higher_is_better": task.higher_is_better,
        "optimizer": spec.name,
        "optimizer_label": spec.label,
        "kind": spec.kind,
        "lr": lr,
        "hyper": results_io.recorded_setting(spec.hyper),
        "seed": seed,
        "steps": steps,
        "completed_steps": len(losses),
        "diverged": diverged,
        "loss": losses,
        "wall": wall,
        "eval": evaluation,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "environment": environment(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    if tracks_tuner:
        record["trace"] = trace
    if tracks_exact:
        record["exact_loss"] = exact
    return record


# ---------------------------------------------------------------------------------------------------------------
# Suites


@dataclass
class SuiteConfig:
    tasks: Sequence[str]
    optimizers: Sequence[str]
    seeds: Sequence[int] = DEFAULT_SEEDS
    steps: int | None = None  # None: each task's default (or quick) budget
    quick: bool = False
    results_dir: Path = results_io.DEFAULT_RESULTS_DIR
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task name
    progress: bool = True
    command: str | None = None  # how the user started the suite, stored in every results file
    peers_on_every_seed: bool = False  # the tuning-free peers on every seed too (default: the first seed only)


@dataclass
class SuiteOutcome:
    ran: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # optimizer -> why
    missing_data: dict[str, str] = field(default_factory=dict)  # task -> how to install its data
    chosen_lr: dict[tuple[str, str], float | None] = field(default_factory=dict)  # (task, optimizer) -> lr


def build_task(name: str, config: SuiteConfig) -> Task:
    options = dict(config.task_options.get(name, {}))
    task = get_task(name, **options)
    if config.quick and task.quick_options:
        task = get_task(name, **{**task.quick_options, **options})
    return task


class _Progress:
    """tqdm bars (one for the suite, one per run) when tqdm is installed and wanted; silent otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
            except ImportError:
                pass
        self.suite = self._tqdm(total=total, desc="runs", unit="run", position=0) if self._tqdm else None

    def run_bar(self, description: str, steps: int) -> Callable[[int, float], None] | None:
        if self._tqdm is None:
            return None
        bar = self._tqdm(total=steps, desc=description, unit="step", position=1, leave=False, mininterval=0.5)
        self._bar = bar

        def update(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0 or step == steps:
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

        return update

    def run_done(self, count: bool = True) -> None:
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
            self._bar = None
        if self.suite is not None and count:
            self.suite.update(1)

    def write(self, message: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
        if self.suite is not None:
            self.suite.close()


def _runs_every_seed(spec: OptimizerSpec, config: SuiteConfig) -> bool:
    """An untuned optimizer's runs: every seed for YellowFin and the control, the first for the tuning-free peers
    (unless ``config.peers_on_every_seed``)."""
    return spec.kind == CONTROL or spec.every_seed or config.peers_on_every_seed


def planned_run_count(config: SuiteConfig, specs: Sequence[OptimizerSpec], tasks: Sequence[Task]) -> int:
    count = 0
    for task in tasks:
        for spec in specs:
            if spec.kind == TUNED:
                count += len(task.lr_grids.get(spec.name, ())) + len(config.seeds) - 1
            elif _runs_every_seed(spec, config):
                count += len(config.seeds)
            else:
                count += 1
    return count


def run_suite(config: SuiteConfig, log: Callable[[str], None] | None = None) -> SuiteOutcome:
    """Run (or resume) a suite. Per task: YellowFin and the tuning-free peers; each tuned baseline's grid on the
    first seed, then its best learning rate (by the validation metric) on the other seeds; then the control,
    which replays the step size from the YellowFin run of the same seed (run first if missing).

    The tuning-free peers run on the first seed only, to fit the time budget, unless
    ``config.peers_on_every_seed``; YellowFin, the tuned baselines and the control run on every seed. A task whose
    data is missing is skipped (outcome.missing_data)."""
    return _Suite(config, log).run()


class _Suite:
    def __init__(self, config: SuiteConfig, log: Callable[[str], None] | None) -> None:
        self.config = config
        self.outcome = SuiteOutcome()
        self.specs = []
        for spec in resolve_optimizers(config.optimizers):
            if spec.available():
                self.specs.append(spec)
            else:
                self.outcome.unavailable[spec.name] = spec.missing_message()
        self.tasks = [build_task(name, config) for name in config.tasks]
        self.progress = _Progress(planned_run_count(config, self.specs, self.tasks), config.progress)
        self.say = log or self.progress.write
        # Checked when the first run is about to train, so resuming a finished suite needs no write access.
        self.results_writable = False

    def spec_named(self, name: str | None) -> OptimizerSpec:
        if name is None:
            raise ValueError("a control spec must name the spec it replays (OptimizerSpec.replays)")
        return get_optimizer_spec(name)

    def run(self) -> SuiteOutcome:
        for message in self.outcome.unavailable.values():
            self.say(f"skipping: {message}")
        try:
            # Every task's data first: broken data (DataInvalidError) stops the suite before anything trains.
            ready = []
            for task in self.tasks:
                try:
                    task.load_data()
                    ready.append(task)
                except DataNotFoundError as exc:
                    self.outcome.missing_data[task.name] = str(exc)
                    self.say(f"{task.name}: skipped, data missing. {exc}")
            for task in ready:
                self.run_task(task)
        finally:
            self.progress.close()
        return self.outcome

    def run_task(self, task: Task) -> None:
        config = self.config
        steps = config.steps or (task.quick_steps if config.quick else task.default_steps)
        seeds = list(config.seeds)
        for spec in self.specs:
            if spec.kind == TUNED:
                grid = task.lr_grids.get(spec.name)
                if not grid:
                    self.say(f"{task.name}: no learning-rate grid for {spec.name}; skipped")
                    continue
                grid_records = [self.execute(task, steps, spec, seeds[0], lr) for lr in grid]
                chosen = results_io.best_lr(grid_records)
                self.outcome.chosen_lr[(task.name, spec.name)] = chosen
                if chosen is None:
                    self.say(f"{task.name}: every {spec.name} grid run diverged")
                    continue
                self.say(f"{task.name}: {spec.name} lr={chosen:g} chosen on the validation split")
                for seed in seeds[1:]:
                    self.execute(task, steps, spec, seed, chosen)
            elif _runs_every_seed(spec, config):
                for seed in seeds:
                    self.execute(task, steps, spec, seed)
            else:
                self.execute(task, steps, spec, seeds[0])

    def execute(self, task: Task, steps: int, spec: OptimizerSpec, seed: int, lr: float | None = None,
                planned: bool = True) -> dict[str, Any]:
        """The run's record: read from its results file when done before, else trained and written."""
        path = results_io.run_path(self.config.results_dir, task.name, spec.name, seed, steps, lr)
        try:
            record = results_io.load_result(path)
        except FileNotFoundError:
            record = None
        except results_io.InvalidResultError as exc:
            self.say(f"running again, the results file is unusable: {exc}")
            record = None
        if record is not None:
            if planned:
                self.outcome.skipped.append(path)
                self.progress.run_done()
            return record
        schedule = None
        if spec.kind == CONTROL:
            replayed = self.spec_named(spec.replays)
            reference = self.execute(task, steps, replayed, seed, planned=False)
            schedule = reference.get("trace", {}).get("effective_lr")
            if not schedule:
                raise RuntimeError(f"{task.name}: the {replayed.name} run for seed {seed} has no trace to replay")
        if not self.results_writable:  # checked once, before the first training, for every task's directory
            results_io.check_writable(self.config.results_dir, [t.name for t in self.tasks])
            self.results_writable = True
        lr_text = f" lr={lr:g}" if lr is not None else ""
        bar = self.progress.run_bar(f"{task.name} {spec.name}{lr_text} seed={seed}", steps)
        record = train_run(task, spec, seed, steps, lr=lr, lr_schedule=schedule, progress=bar)
        if self.config.command:
            record["command"] = self.config.command
        results_io.write_result(path, record)
        self.outcome.ran.append(path)
        self.progress.run_done(count=planned)
        return record
