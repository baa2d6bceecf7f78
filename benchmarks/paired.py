"""Paired differences between two directories of runs of the same optimizer: a screen against its baseline.

Each task's final smoothed training loss (the quadratic: exact excess loss, as the ablation measures it), seed by
seed, for the runs that both directories hold, and the paired difference (screen minus baseline), mean ± standard
error. Used for the screens whose patched tree cannot live in the library (docs/tuner.md §17): each screen's
directory holds its runs and, in its README, the patch and the commands that made them.

    python benchmarks/paired.py benchmarks/results-screen-baseline benchmarks/results-screen-lag-one

Either side may also be ``screen:VARIANT``, that variant's runs of benchmarks/tuner_screen.py (the prototypes, in
benchmarks/results-tuner-screen; its ``library_*`` variants are the bench's runs of the library to the last bit).
For a prototype that hands out another point than the one it takes its gradients at, the quadratic is measured
at the point handed out, or with ``--at-iterate`` at the gradients' point.

    python benchmarks/paired.py benchmarks/results-screen-baseline screen:primal_averaging_poly
    python benchmarks/paired.py benchmarks/results-screen-baseline benchmarks/results-primal-average \
        --screen-optimizer yf_scale_free_dowg_clip_trigger_hold_primal_average
"""

from __future__ import annotations

import argparse
import json
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


SCREEN_PREFIX = "screen:"
SCREEN_RESULTS = Path(__file__).resolve().parent / "results-tuner-screen"


def finals(directory: Path, optimizer: str) -> dict[tuple[str, int], float]:
    return {(r["task"]["name"], r["seed"]): final_smoothed(r)
            for r in results_io.load_results(directory) if r["optimizer"] == optimizer}


def screen_finals(variant: str, at_iterate: bool = False, root: Path = SCREEN_RESULTS) -> dict[tuple[str, int], float]:
    """``finals`` of a tuner_screen variant's runs, each read as the runner's record of the same run."""
    out = {}
    for path in sorted(root.glob(f"*/{variant}_seed*.json")):
        run = json.loads(path.read_text())
        if "steps" not in path.parent.name and isinstance(run.get("losses"), list):
            exact = run.get("exact_loss_at_iterate") if at_iterate else None
            losses = [math.inf if v is None else v for v in run["losses"]]
            record = {"steps": run["steps"], "loss": losses, "exact_loss": exact or run.get("exact_loss"),
                      "diverged": not all(math.isfinite(v) for v in losses)}
            out[(run["task"], run["seed"])] = final_smoothed(record)
    return out


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
    parser.add_argument("baseline", help="a directory of results, or screen:VARIANT")
    parser.add_argument("screen", help="a directory of results, or screen:VARIANT")
    parser.add_argument("--optimizer", default="yellowfin", help="the runs' optimizer name (default: yellowfin)")
    parser.add_argument("--screen-optimizer", default=None,
                        help="the screen's runs' optimizer name, where it differs (an ablation variant's yf_NAME)")
    parser.add_argument("--at-iterate", action="store_true",
                        help="a screen variant's quadratic at the point it takes its gradients at")
    args = parser.parse_args(argv)

    def read(source: str, optimizer: str) -> dict[tuple[str, int], float]:
        if source.startswith(SCREEN_PREFIX):
            runs = screen_finals(source.removeprefix(SCREEN_PREFIX), args.at_iterate)
            if not runs:
                parser.error(f"{source}: no runs of that variant in {SCREEN_RESULTS}")
            return runs
        if not Path(source).is_dir():
            parser.error(f"{source} is not a directory of results")
        return finals(Path(source), optimizer)

    baseline, screen = read(args.baseline, args.optimizer), read(args.screen, args.screen_optimizer or args.optimizer)
    if not set(baseline) & set(screen):
        parser.error(f"no task and seed is in both ({args.baseline}, {args.screen})")
    print(table(baseline, screen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
