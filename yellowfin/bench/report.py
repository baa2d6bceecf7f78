"""Results files -> comparison tables, figures and the generated sections of docs/benchmarks.md.

Each results directory becomes one section, fenced by HTML comments, so the hand-written reading around it
survives regeneration.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from yellowfin.bench import metrics
from yellowfin.bench import results as results_io
from yellowfin.bench.errors import BadInputError, NotWritableError
from yellowfin.bench.optimizers import CONTROL, OPTIMIZERS, TUNED, find_optimizer_spec

DEFAULT_MARKDOWN = Path("docs") / "benchmarks.md"
DEFAULT_FIGURES = Path("docs") / "figures"
ROBUSTNESS_FIGURE = "robustness.png"


@dataclass
class OptimizerSummary:
    """One optimizer on one task: its final runs (all seeds, chosen lr) and what the table reports."""

    name: str
    label: str
    kind: str
    lr: float | None
    records: list[dict[str, Any]]
    curve: np.ndarray  # smoothed mean training loss over seeds
    grid: list[tuple[float, float]] = field(default_factory=list)  # (lr, val score) for tuned optimizers
    diverged_seeds: int = 0

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.records)

    def test_metric(self, metric: str) -> tuple[float, float] | None:
        values = [r["eval"]["test"][metric] for r in self.records
                  if not r.get("diverged") and r.get("eval", {}).get("test", {}).get(metric) is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def seconds_per_step(self) -> float:
        return statistics.median(r["train_seconds"] / max(1, r["completed_steps"]) for r in self.records)

    def wall_at(self, step: int) -> float | None:
        """Mean training wall time (seconds) at a 1-based step across seeds that got that far."""
        times = [r["wall"][step - 1] for r in self.records if len(r["wall"]) >= step]
        return statistics.fmean(times) if times else None


@dataclass
class TaskSummary:
    task: str
    steps: int
    metric: str
    higher_is_better: bool
    optimizers: dict[str, OptimizerSummary]
    reference: str | None  # the best tuned baseline (lowest best smoothed training loss)
    window: int
    objective: str = "training loss"  # what the curves are: mini-batch training loss, or the exact objective
    curve_key: str = "loss"  # the records' field the curves are made of ("loss" or "exact_loss")

    @property
    def highlighted(self) -> str | None:
        """The method under study (its spec's highlight), when present: the first one in table order."""
        return next((name for name in self.optimizers if _is_highlighted(name)), None)

    def speedup_of_yellowfin_over(self, name: str) -> float | None:
        studied = self.highlighted
        if studied is None or name == studied:
            return None
        return metrics.speedup(self.optimizers[name].curve, self.optimizers[studied].curve)

    def speedup_against_reference(self, name: str) -> float | None:
        if self.reference is None:
            return None
        return metrics.speedup(self.optimizers[self.reference].curve, self.optimizers[name].curve)

    def reference_target(self) -> tuple[float, int] | None:
        return None if self.reference is None else metrics.best_point(self.optimizers[self.reference].curve)

    def wall_to_reference_target(self, name: str) -> float | None:
        target = self.reference_target()
        if target is None:
            return None
        reached = metrics.steps_to_reach(self.optimizers[name].curve, target[0])
        return None if reached is None else self.optimizers[name].wall_at(reached)


def _is_highlighted(name: str) -> bool:
    spec = find_optimizer_spec(name)
    return spec is not None and spec.highlight


def summarize(records: Sequence[dict[str, Any]]) -> list[TaskSummary]:
    """Group records by (task, step budget), pick each tuned baseline's learning rate from its grid on the
    validation split, and build the per-optimizer curves."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["task"]["name"], record["steps"])].append(record)
    summaries = []
    for (task, steps), group in sorted(groups.items()):
        window = metrics.smoothing_window(steps)
        # Where the task records its exact objective (the quadratic), compare on it: no mini-batch noise floor.
        exact = all(r.get("exact_loss") for r in group)
        curve_key = "exact_loss" if exact else "loss"
        by_optimizer: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in group:
            by_optimizer[record["optimizer"]].append(record)
        optimizers: dict[str, OptimizerSummary] = {}
        for name in [n for n in OPTIMIZERS if n in by_optimizer] + sorted(set(by_optimizer) - set(OPTIMIZERS)):
            runs = by_optimizer[name]
            kind = runs[0].get("kind", "untuned")
            lr, grid = None, []
            if kind == TUNED:
                grid_seed = min(r["seed"] for r in runs)
                grid_runs = sorted((r for r in runs if r["seed"] == grid_seed), key=lambda r: r["lr"])
                grid = [(r["lr"], results_io.val_score(r)) for r in grid_runs]
                lr = results_io.best_lr(grid_runs)
                if lr is None:
                    continue
                runs = [r for r in runs if r["lr"] == lr]
            curve = metrics.smooth(metrics.mean_curve([r[curve_key] for r in runs]), window)
            optimizers[name] = OptimizerSummary(name, runs[0].get("optimizer_label", name), kind, lr, runs, curve,
                                                grid, sum(bool(r.get("diverged")) for r in runs))
        tuned = [s for s in optimizers.values() if s.kind == TUNED and metrics.best_point(s.curve) is not None]
        reference = min(tuned, key=lambda s: metrics.best_point(s.curve)[0]).name if tuned else None
        first = group[0]
        summaries.append(TaskSummary(task, steps, first["task"]["metric"], bool(first.get("higher_is_better")),
                                     optimizers, reference, window,
                                     "exact excess loss f(x) - f(x*)" if exact else "training loss", curve_key))
    return summaries


# ---------------------------------------------------------------------------------------------------------------
# Figures


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; every figure of the reports goes through here."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_losses(summary: TaskSummary, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, (name, opt) in enumerate(summary.optimizers.items()):
        steps = np.arange(1, len(opt.curve) + 1)
        finite = np.isfinite(opt.curve)
        label = opt.label + (f" lr={opt.lr:g}" if opt.lr is not None else "")
        label += f" ({len(opt.records)} seed{'s' if len(opt.records) > 1 else ''})"
        if opt.diverged_seeds:
            label += f", {opt.diverged_seeds} diverged"
        style = ({"lw": 2.4, "color": "gold", "zorder": 5} if name == summary.highlighted
                 else {"lw": 1.2, "color": f"C{index}"})
        if opt.kind == CONTROL:
            style["ls"] = "--"
        ax.plot(steps[finite], opt.curve[finite], label=label, **style)
    target = summary.reference_target()
    if target is not None:
        ax.axhline(target[0], color="gray", lw=0.7, ls=":", label="best tuned baseline's best")
    ax.set_yscale("log")
    starts = [o.curve[np.isfinite(o.curve)][0] for o in summary.optimizers.values()
              if not o.diverged_seeds and np.isfinite(o.curve).any()]
    if starts:  # a diverging run would otherwise stretch the axis over dozens of decades
        ax.set_ylim(top=3 * max(starts))
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{summary.objective}\n(mean over seeds, {summary.window}-step moving average)")
    ax.set_title(f"{summary.task}: {summary.objective}, {summary.steps} steps")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_yellowfin_trace(summary: TaskSummary, path: Path) -> Path | None:
    opt = summary.optimizers.get(summary.highlighted) if summary.highlighted else None
    if opt is None or not any(r.get("trace") for r in opt.records):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for record in opt.records:
        trace = record.get("trace") or {}
        steps = np.arange(1, len(trace.get("mu", [])) + 1)
        axes[0].plot(steps, trace.get("applied_momentum", trace.get("mu")), lw=1, label=f"seed {record['seed']}")
        axes[1].plot(steps, trace.get("lr"), lw=1)
        axes[2].plot(steps, trace.get("effective_lr"), lw=1)
    axes[0].set_title("tuned momentum mu")
    axes[0].set_ylim(0, 1)
    axes[1].set_title("tuned learning rate alpha")
    axes[2].set_title("effective step alpha / (1 - mu)")
    for ax in axes:
        ax.set_xlabel("iteration")
    for ax in axes[1:]:
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{summary.task}: YellowFin's tuned values")
    return save_figure(fig, path)


def plot_speedups(summaries: Sequence[TaskSummary], path: Path) -> Path | None:
    """YellowFin's speedup over every other optimizer, per task: bars from 1 (log scale), up when YellowFin is
    faster; "x" where YellowFin never reached that optimizer's best, "d" where that optimizer diverged."""
    rows = [(s, [n for n in s.optimizers if n != s.highlighted]) for s in summaries if s.highlighted]
    if not rows:
        return None
    plt = pyplot()
    from matplotlib.ticker import LogLocator, ScalarFormatter

    names = list(dict.fromkeys(n for _, ns in rows for n in ns))
    fig, ax = plt.subplots(figsize=(max(6.5, 2.4 * len(rows)), 4.4))
    width = 0.8 / max(1, len(names))
    labelled: set[str] = set()
    for j, name in enumerate(names):
        for i, (summary, present) in enumerate(rows):
            if name not in present:
                continue
            x = i + (j - (len(names) - 1) / 2) * width
            opt = summary.optimizers[name]
            value = summary.speedup_of_yellowfin_over(name)
            if opt.diverged_seeds == len(opt.records) or value is None:
                marker = "d" if opt.diverged_seeds == len(opt.records) else "x"
                ax.text(x, 1.0, marker, ha="center", va="bottom", color=f"C{j}", fontsize=10, fontweight="bold")
                ax.bar(x, 0, width, color=f"C{j}", label=None if name in labelled else name)
            else:
                ax.bar(x, value - 1.0, width, bottom=1.0, color=f"C{j}", label=None if name in labelled else name)
            labelled.add(name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xticks(range(len(rows)), [f"{s.task}\n({s.steps} steps)" for s, _ in rows])
    ax.set_ylabel("YellowFin speedup (iterations)")
    ax.set_title("Speedup of YellowFin over X: iterations for X to reach its best\nsmoothed loss / iterations for "
                 "YellowFin to reach it (x: never; d: X diverged)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: float | None, spec: str = ".3g", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def task_table(summary: TaskSummary) -> str:
    metric = summary.metric
    ref = summary.reference
    arrow = "higher is better" if summary.higher_is_better else "lower is better"
    header = (f"| optimizer | lr | seeds | test {metric} ({arrow}) | best smoothed {summary.objective} | "
              f"YF speedup over it | speedup vs {ref or 'best tuned'} | wall s to {ref or 'ref'}'s best | ms/step |")
    lines = [header, "|" + "---|" * 9]
    for name, opt in summary.optimizers.items():
        test = opt.test_metric(metric)
        test_text = "diverged" if test is None else f"{test[0]:.4g} ± {test[1]:.2g}"
        best = metrics.best_point(opt.curve)
        seeds = f"{len(opt.records)}" + (f" ({opt.diverged_seeds} diverged)" if opt.diverged_seeds else "")
        lines.append("| " + " | ".join([
            f"**{opt.label}**" if name == summary.highlighted else opt.label,
            _fmt(opt.lr, "g", "-"),
            seeds,
            test_text,
            _fmt(best[0] if best else None, ".4g"),
            "-" if name == summary.highlighted else
            "diverged" if opt.diverged_seeds == len(opt.records) else
            _fmt(summary.speedup_of_yellowfin_over(name), ".2f", "never"),
            _fmt(summary.speedup_against_reference(name), ".2f", "never"),
            _fmt(summary.wall_to_reference_target(name), ".1f", "never"),
            _fmt(1000 * opt.seconds_per_step(), ".3g"),
        ]) + " |")
    return "\n".join(lines)


def grid_notes(summary: TaskSummary) -> list[str]:
    notes = []
    for opt in summary.optimizers.values():
        if opt.kind != TUNED or not opt.grid:
            continue
        grid = [lr for lr, _ in opt.grid]
        edge = " (at the edge of the grid: the best value may lie outside it)" if opt.lr in (grid[0], grid[-1]) else ""
        scores = ", ".join(f"{lr:g}: {'diverged' if not math.isfinite(s) else format(abs(s), '.4g')}"
                           for lr, s in opt.grid)
        notes.append(f"- {opt.label}: lr {opt.lr:g} chosen on the validation {summary.metric}{edge}; grid {scores}")
    return notes


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _threads_text(records: Sequence[dict[str, Any]]) -> str:
    """How many torch threads the runs used: one number when they agree, else each count with its runs' tasks
    (a suite resumed with --threads mixes them, and per-step times are only comparable within a count)."""
    runs: dict[Any, list[str]] = defaultdict(list)
    for record in records:
        runs[record.get("environment", {}).get("torch_threads", "?")].append(record["task"]["name"])
    if len(runs) <= 1:
        return f"{next(iter(runs), '?')} torch threads"
    parts = []
    for threads, tasks in sorted(runs.items(), key=lambda item: -len(item[1])):
        names = ", ".join(sorted(set(tasks)))
        parts.append(f"{threads} in {len(tasks)} run{'s' if len(tasks) != 1 else ''} ({names})")
    return "torch threads per run: " + "; ".join(parts)


def render_section(results_dir: Path, summaries: Sequence[TaskSummary], figures: dict[str, Path],
                   markdown_dir: Path) -> str:
    records = [r for s in summaries for o in s.optimizers.values() for r in o.records]
    commands = sorted({r.get("command", "") for r in records if r.get("command")})
    env = records[0]["environment"] if records else {}
    packages = env.get("packages", {})
    shown = _relative(results_dir, Path.cwd()) if results_dir.is_absolute() else results_dir.as_posix()
    lines = [f"### Results in `{shown}`", ""]
    if not summaries:
        return "\n".join(lines + ["No results found.", ""])
    lines += ["Produced by:", "", "```"] + commands + ["```", ""]
    lines += [
        f"Machine: {env.get('platform', '?')}, {env.get('cpu_count', '?')} CPUs visible, "
        f"{_threads_text(records)}; Python {env.get('python', '?')}, "
        f"torch {packages.get('torch')}, yellowfin {packages.get('yellowfin-optim')}. Wall times are on a machine "
        "shared with other jobs and are noisy.",
        "",
    ]
    for summary in summaries:
        lines += [f"#### {summary.task} ({summary.steps} steps)", ""]
        if summary.reference:
            target = summary.reference_target()
            lines += [f"Reference for the speedup columns: {summary.optimizers[summary.reference].label}, best smoothed "
                      f"{summary.objective} {target[0]:.4g} reached at iteration {target[1]}.", ""]
        lines += [task_table(summary), ""]
        lines += grid_notes(summary) + [""]
        for key, title in ((f"{summary.task}/{summary.steps}/loss", "training loss"),
                           (f"{summary.task}/{summary.steps}/trace", "YellowFin's tuned mu and alpha")):
            if key in figures:
                lines += [f"![{summary.task}: {title}]({_relative(figures[key], markdown_dir)})", ""]
    if "speedup" in figures:
        lines += [f"![YellowFin speedups]({_relative(figures['speedup'], markdown_dir)})", ""]
    return "\n".join(lines)


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- BEGIN GENERATED: {key} -->", f"<!-- END GENERATED: {key} -->"


def splice(document: str, key: str, body: str) -> str:
    """Replace the generated block `key` in document (or append one), leaving everything else untouched."""
    begin, end = _markers(key)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return document.rstrip() + "\n\n" + block + "\n"


def write_report(results_dirs: Sequence[str | os.PathLike], markdown: str | os.PathLike = DEFAULT_MARKDOWN,
                 figures_dir: str | os.PathLike = DEFAULT_FIGURES, robustness: bool = True) -> dict[str, Any]:
    """Regenerate figures and the generated sections of the markdown file. Returns what was written, and under
    "skipped" the results files left out as unusable (results_io.InvalidResultError, each saying why)."""
    markdown, figures_dir = Path(markdown), Path(figures_dir)
    # Bad paths are refused before any figure is drawn.
    for results_dir in map(Path, results_dirs):
        if not results_dir.is_dir():
            raise BadInputError(f"results directory {results_dir} does not exist or is not a directory")
    if markdown.is_dir():
        raise NotWritableError(f"cannot write the report to {markdown}: it is a directory; give a .md file")
    results_io.check_writable(markdown.parent)
    results_io.check_writable(figures_dir)
    document = markdown.read_text(encoding="utf-8") if markdown.is_file() else "# Benchmarks\n"
    written: dict[str, Any] = {"figures": [], "sections": [], "skipped": []}
    for results_dir in map(Path, results_dirs):
        records, invalid = results_io.scan_results(results_dir)
        written["skipped"] += invalid
        summaries = summarize(records)
        prefix = results_dir.name
        figures: dict[str, Path] = {}
        for summary in summaries:
            stem = f"{prefix}-{summary.task}-{summary.steps}"
            figures[f"{summary.task}/{summary.steps}/loss"] = plot_losses(summary, figures_dir / f"{stem}-loss.png")
            trace = plot_yellowfin_trace(summary, figures_dir / f"{stem}-yellowfin.png")
            if trace is not None:
                figures[f"{summary.task}/{summary.steps}/trace"] = trace
        speedup = plot_speedups(summaries, figures_dir / f"{prefix}-speedup.png")
        if speedup is not None:
            figures["speedup"] = speedup
        document = splice(document, prefix, render_section(results_dir, summaries, figures, markdown.parent))
        written["figures"] += list(figures.values())
        written["sections"].append(prefix)
        written.setdefault("summaries", {})[prefix] = summaries
    if robustness:
        from yellowfin.bench import robustness as robustness_module

        data = robustness_module.compute()
        path = robustness_module.plot(data, figures_dir / ROBUSTNESS_FIGURE)
        flatness = robustness_module.robust_region_flatness(data)
        body = "\n".join([
            f"![Robustness of the momentum operator]({_relative(path, markdown.parent)})",
            "",
            "Largest deviation of the measured rate from sqrt(mu) inside the robust region (panel a): "
            + ", ".join(f"mu={mu:g}: {dev:.3g}" for mu, dev in flatness.items()) + ".",
            "",
            "Produced by `yellowfin report` (yellowfin/bench/robustness.py): torch.optim.SGD with momentum in "
            "float64, rate fitted on the second half of each trajectory; theory from yellowfin.tuning.",
        ])
        document = splice(document, "robustness", body)
        written["figures"].append(path)
        written["robustness"] = flatness
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(document, encoding="utf-8")
    written["markdown"] = markdown
    return written
