"""Paired differences between two directories of runs of the same optimizer: a screen against its baseline.

Each task's final smoothed training loss (the quadratic: exact excess loss, as the ablation measures it), seed by
seed, for the runs that both directories hold, and the paired difference (screen minus baseline), mean ± standard
error. Used for the screens whose patched tree cannot live in the library (docs/tuner.md §17): each screen's
directory holds its runs and, in its README, the patch and the commands that made them.

    python benchmarks/paired.py benchmarks/results-screen-baseline benchmarks/results-screen-lag-one
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from yellowfin.bench import ablation, metrics
from yellowfin.bench import results as results_io
from yellowfin.bench.tasks import TABLE_ORDER



def final_smoothed(record: dict) -> float:
    """The ablation's measure of one run: its smoothed curve at the last step, on the exact loss where the task
    records it (the quadratic), inf if it diverged."""
    curve_key = "exact_loss" if record.get("exact_loss") else "loss"
    return ablation.final_smoothed(record, curve_key, metrics.smoothing_window(record["steps"]))


def finals(directory: Path, optimizer: str) -> dict[tuple[str, int], float]:
    return {(r["task"]["name"], r["seed"]): final_smoothed(r)
            for r in results_io.load_results(directory) if r["optimizer"] == optimizer}


def table(baseline: dict, screen: dict) -> str:
    lines = ["| task | baseline, seed by seed | screen, seed by seed | paired difference |", "|---|---|---|---|"]
    for task in TABLE_ORDER:
        seeds = sorted(seed for (name, seed) in baseline if name == task and (name, seed) in screen)
        if not seeds:
            continue
        before, after = [baseline[(task, s)] for s in seeds], [screen[(task, s)] for s in seeds]
        differences = [b - a for a, b in zip(before, after)]
        error = statistics.stdev(differences) / math.sqrt(len(seeds)) if len(seeds) > 1 else math.nan
        lines.append(f"| {task} | {', '.join(f'{v:.4g}' for v in before)} | {', '.join(f'{v:.4g}' for v in after)} "
                     f"| {statistics.mean(differences):+.2g} ± {error:.2g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("screen", type=Path)
    parser.add_argument("--optimizer", default="yellowfin", help="the runs' optimizer name (default: yellowfin)")
    args = parser.parse_args(argv)
    for directory in (args.baseline, args.screen):
        if not directory.is_dir():
            parser.error(f"{directory} is not a directory of results")
    baseline, screen = finals(args.baseline, args.optimizer), finals(args.screen, args.optimizer)
    if not set(baseline) & set(screen):
        parser.error(f"no task and seed of {args.optimizer!r} is in both directories")
    print(table(baseline, screen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
