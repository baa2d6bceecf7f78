"""Ablations: YellowFin variants (yellowfin/bench/variants.py) x tasks x seeds, run by the benchmark runner into
the usual results files (so a rerun resumes), and the table that compares them.

    yellowfin ablate quadratic digits_mlp --variants reference paper control --quick

Per task, the table gives each variant's final smoothed training loss (the report's smoothing: a trailing moving
average over 1/40 of the budget), mean and standard deviation over seeds, and its speedup against tuned momentum
SGD where results of that baseline exist for the same task and budget (run with --baselines sgd_momentum, or
found in the suite's results directory).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from yellowfin.bench import metrics
from yellowfin.bench import results as results_io
from yellowfin.bench.report import TaskSummary, summarize
from yellowfin.bench.runner import DEFAULT_SEEDS, SuiteConfig, SuiteOutcome, run_suite
from yellowfin.bench.variants import DEFAULT_VARIANTS, SPEC_PREFIX, VARIANTS, get_variant

DEFAULT_ABLATION_DIR = Path("benchmarks") / "results-ablation"
QUICK_ABLATION_DIR = Path("benchmarks") / "results-ablation-quick"
QUICK_ABLATION_SEEDS = (0, 1)  # screening: two seeds show whether a difference is larger than the seed noise
BASELINE = "sgd_momentum"  # the speedup column's reference: grid-tuned momentum SGD
ADAM = "adam"  # the second speedup column's: grid-tuned Adam (the preconditioned tuner's yardstick)
# Also shown beside the variants when their runs exist (the issues' other yardsticks): tuned Adam and the
# tuning-free peers at their defaults.
PEERS = (BASELINE, ADAM, "dog", "schedulefree_adamw", "prodigy", "dadapt_adam")
PEER_LABELS = {BASELINE: "tuned momentum SGD", ADAM: "tuned Adam", "dog": "DoG",
               "schedulefree_adamw": "Schedule-Free AdamW", "prodigy": "Prodigy", "dadapt_adam": "D-Adaptation Adam"}
TUNED = (BASELINE, ADAM)  # the yardsticks, which run on every seed; the tuning-free peers' rows name their seeds
TABLE_FILE = "ablation.md"


@dataclass
class AblationConfig:
    tasks: Sequence[str]
    variants: Sequence[str] = DEFAULT_VARIANTS
    seeds: Sequence[int] = DEFAULT_SEEDS
    steps: int | None = None  # None: each task's default (or quick) budget
    quick: bool = False
    results_dir: Path = DEFAULT_ABLATION_DIR
    baselines: Sequence[str] = ()  # suite optimizers run beside the variants (e.g. sgd_momentum, with its grid)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    command: str | None = None


def run_ablation(config: AblationConfig, log: Callable[[str], None] | None = None) -> SuiteOutcome:
    """Run (or resume) every variant on every task and seed; the runner skips runs whose results file exists.
    A control variant replays its variant's trace from the same directory (running that variant first if
    needed)."""
    names = [get_variant(name).spec_name for name in config.variants] + list(config.baselines)
    suite = SuiteConfig(tasks=config.tasks, optimizers=names, seeds=config.seeds, steps=config.steps,
                        quick=config.quick, results_dir=config.results_dir, task_options=config.task_options,
                        progress=config.progress, command=config.command)
    return run_suite(suite, log)


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class VariantRow:
    name: str  # variant name, or the baseline's optimizer name
    description: str
    seeds: int
    diverged: int
    final: tuple[float, float] | None  # mean and standard deviation over the seeds that did not diverge
    speedup: float | None  # against tuned momentum SGD; None: never reaches its best, or no baseline
    speedup_vs_adam: float | None = None  # likewise against tuned Adam


def final_smoothed(record: dict[str, Any], curve_key: str, window: int) -> float:
    """The run's smoothed curve at its last step; infinite for a run that diverged."""
    if record.get("diverged") or not record[curve_key]:
        return math.inf
    return float(metrics.smooth(metrics.mean_curve([record[curve_key]]), window)[-1])


def variant_rows(summary: TaskSummary) -> list[VariantRow]:
    """One row per variant present in the summary (registry order), then the peers present (PEERS' order)."""
    baseline, adam = summary.optimizers.get(BASELINE), summary.optimizers.get(ADAM)
    rows = []
    names = [name for name in VARIANTS if SPEC_PREFIX + name in summary.optimizers]
    peers = [(name, f"grid-tuned, lr {opt.lr:g}" if opt.lr is not None else "its defaults", opt)
             for name in PEERS if (opt := summary.optimizers.get(name)) is not None]
    for name, description, opt in ([(n, VARIANTS[n].description, summary.optimizers[SPEC_PREFIX + n]) for n in names]
                                   + peers):
        finals = [final_smoothed(r, summary.curve_key, summary.window) for r in opt.records]
        finite = [v for v in finals if math.isfinite(v)]
        final = (statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0) if finite else None
        speedup = metrics.speedup(baseline.curve, opt.curve) if baseline is not None else None
        speedup_vs_adam = metrics.speedup(adam.curve, opt.curve) if adam is not None else None
        rows.append(VariantRow(name, description, len(finals), len(finals) - len(finite), final, speedup,
                               speedup_vs_adam))
    return rows


def _baseline_records(directories: Sequence[Path], present: set[tuple[str, int]]) -> list[dict[str, Any]]:
    """Tuned momentum SGD runs from other results directories, for (task, steps) the ablation lacks."""
    found = []
    for directory in directories:
        if not Path(directory).is_dir():
            continue
        for record in results_io.load_results(directory):
            key = (record["task"]["name"], record["steps"])
            if record["optimizer"] in PEERS and key not in present:
                found.append(record)
    return found


def ablation_summaries(results_dir: Path, baseline_dirs: Sequence[Path] = ()) -> list[TaskSummary]:
    records = results_io.load_results(results_dir)
    own_baselines = {(r["task"]["name"], r["steps"]) for r in records if r["optimizer"] in PEERS}
    tasks_here = {(r["task"]["name"], r["steps"]) for r in records}
    extra = [r for r in _baseline_records(baseline_dirs, own_baselines)
             if (r["task"]["name"], r["steps"]) in tasks_here]
    return summarize(records + extra)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def ablation_table(summaries: Sequence[TaskSummary]) -> str:
    lines = []
    for summary in summaries:
        rows = variant_rows(summary)
        if not rows:
            continue
        lines += [f"#### {summary.task} ({summary.steps} steps): final smoothed {summary.objective}", "",
                  f"| variant | what it changes | seeds | final smoothed {summary.objective} (mean ± std) | "
                  f"speedup vs tuned momentum SGD | speedup vs tuned Adam |", "|---|---|---|---|---|---|"]
        for row in rows:
            final = "diverged" if row.final is None else f"{row.final[0]:.4g} ± {row.final[1]:.2g}"
            seeds = f"{row.seeds}" + (f" ({row.diverged} diverged)" if row.diverged else "")
            speedups = [_fmt(value, ".2f").replace("n/a", "never") if against in summary.optimizers
                        else "no baseline results" for value, against in ((row.speedup, BASELINE),
                                                                          (row.speedup_vs_adam, ADAM))]
            # (a description's norms, ||g||, would end the cell: markdown reads an escaped pipe as text)
            description = row.description.replace("|", "\\|")
            lines.append(f"| {row.name} | {description} | {seeds} | {final} | {' | '.join(speedups)} |")
        lines.append("")
    return "\n".join(lines) if lines else "No ablation results found.\n"


def overview_table(summaries: Sequence[TaskSummary], against: str = BASELINE) -> str:
    """Every variant on every task in one table: final smoothed loss (mean over seeds) and, in brackets, the
    speedup against ``against`` (tuned momentum SGD, or ADAM). The per-task tables hold the spread and the seed
    counts. Empty when no task has runs of ``against`` and it is not the default yardstick."""
    rows_by_task = {summary.task: {row.name: row for row in variant_rows(summary)} for summary in summaries}
    tasks = [task for task, rows in rows_by_task.items() if rows]
    if not tasks or (against != BASELINE and not any(against in rows_by_task[task] for task in tasks)):
        return ""
    names = [name for name in [*VARIANTS, *PEERS] if any(name in rows_by_task[task] for task in tasks)]
    title = "Overview" if against == BASELINE else f"Against {PEER_LABELS[against]}"
    lines = [f"#### {title}: final smoothed training loss (quadratic: exact excess loss), mean over seeds "
             f"(speedup vs {PEER_LABELS[against]})", "",
             "| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name in names:
        cells = []
        for task in tasks:
            row = rows_by_task[task].get(name)
            if row is None:
                cells.append("-")
            elif row.final is None:
                cells.append("diverged")
            else:
                value = row.speedup if against == BASELINE else row.speedup_vs_adam
                speedup = _fmt(value, ".2f").replace("n/a", "never")
                cells.append(f"{row.final[0]:.4g} ({speedup})" if against in rows_by_task[task] else
                             f"{row.final[0]:.4g}")
        label = PEER_LABELS.get(name, name)
        if name in PEERS and name not in TUNED:
            counts = sorted({rows_by_task[task][name].seeds for task in tasks if name in rows_by_task[task]})
            seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            label += f" ({seeds} seed{'' if seeds == '1' else 's'})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def beats_peer(summary: TaskSummary, name: str, peer: str) -> bool | None:
    """Whether optimizer ``name`` beats ``peer`` on this task by the preconditioned tuner's yardstick (issue 13): the
    fewer iterations to tuned Adam's best smoothed loss where both reach it, the one that reaches it where only one
    does, else (neither, or both in as many iterations) the lower final smoothed loss, mean over seeds. None without
    tuned Adam's runs or either optimizer's."""
    adam, mine, theirs = (summary.optimizers.get(key) for key in (ADAM, name, peer))
    best = metrics.best_point(adam.curve) if adam is not None else None
    if best is None or mine is None or theirs is None:
        return None
    reach = [metrics.steps_to_reach(opt.curve, best[0]) for opt in (mine, theirs)]
    if reach[0] is not None and reach[1] is not None and reach[0] != reach[1]:
        return reach[0] < reach[1]
    if (reach[0] is None) != (reach[1] is None):
        return reach[0] is not None
    finals = [statistics.fmean(final_smoothed(r, summary.curve_key, summary.window) for r in opt.records)
              for opt in (mine, theirs)]
    return finals[0] < finals[1]


def peers_table(summaries: Sequence[TaskSummary]) -> str:
    """Every variant against each tuning-free peer present, task by task (``beats_peer``: W or L), with the count of
    tasks won. Empty without tuned Adam's runs or a peer's."""
    peers = [peer for peer in PEERS if peer not in TUNED
             and any(peer in summary.optimizers and ADAM in summary.optimizers for summary in summaries)]
    names = [name for name in VARIANTS if any(SPEC_PREFIX + name in summary.optimizers for summary in summaries)]
    if not peers or not names:
        return ""
    tasks = [summary for summary in summaries if ADAM in summary.optimizers]
    lines = ["#### Against the tuning-free peers: W where the variant reaches tuned Adam's best smoothed loss in fewer "
             "iterations (where both reach it), or only it reaches it, or it ends lower where neither does or both "
             "take as many; else L", "", "| variant | peer | " + " | ".join(s.task for s in tasks) + " | tasks won |",
             "|---" * (len(tasks) + 3) + "|"]
    for name in names:
        for peer in peers:
            outcomes = [beats_peer(summary, SPEC_PREFIX + name, peer) for summary in tasks]
            cells = ["-" if won is None else ("W" if won else "L") for won in outcomes]
            decided = [won for won in outcomes if won is not None]
            lines.append(f"| {name} | {PEER_LABELS[peer]} | " + " | ".join(cells)
                         + f" | {sum(decided)} of {len(decided)} |")
    return "\n".join(lines) + "\n"


def write_table(results_dir: Path, baseline_dirs: Sequence[Path] = ()) -> tuple[str, Path]:
    """The per-task tables for everything under results_dir, then the overviews and the peers' table, also written
    to results_dir/ablation.md."""
    summaries = ablation_summaries(results_dir, baseline_dirs)
    text = ablation_table(summaries)
    for overview in (overview_table(summaries), overview_table(summaries, against=ADAM), peers_table(summaries)):
        text = text + ("\n" + overview if overview else "")
    path = Path(results_dir) / TABLE_FILE
    results_io.check_writable(path.parent)
    path.write_text(text, encoding="utf-8")
    return text, path
