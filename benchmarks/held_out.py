"""The model each optimizer hands out, on held-out data: the validation split's loss and the task's own measure
(accuracy, perplexity, reconstruction error, the quadratic's exact excess loss), mean and standard deviation over
the seeds, at the point each optimizer's usage evaluates: its last iterate, or its average where averaging is part
of that usage (DoG's polynomial average, Schedule-Free's x, YellowFin's average inside ``averaged()``: the default's,
or heavy ball's with ``average=True``).

The suite's measure is the training loss where each optimizer takes its gradients (docs/benchmarks.md); this table
is the other half of the comparison: what a user gets to keep (docs/tuner.md §17). No run is made here: it reads
the suite's runs (benchmarks/results) and the ablation's (benchmarks/results-ablation), which these commands made:

    yellowfin bench                                            (every suite optimizer, 3 seeds)
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_trigger_hold_average \\
        scale_free_adam_dowg_neutral_start_1e-2 scale_free_adam_dowg_neutral_start_1e-2_average --seeds 0 1 2
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_trigger_hold_primal_average --seeds 0 1 2 \
        --results benchmarks/results-primal-average
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_hold_average \
        scale_free_dowg_clip_hold_primal_average --seeds 0 1 2 --results benchmarks/results-clip-trigger
    yellowfin ablate <the seven tasks> --variants scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average \
        --seeds 0 1 2 --results benchmarks/results-adam-primal-average
    yellowfin ablate <the seven tasks> --variants scale_free_dowg_clip_hold_primal_average_average \
        scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average_average --seeds 0 1 2 \
        --results benchmarks/results-gradient-point-average              (and seeds 3 4 on the quadratic)

A grid-tuned optimizer is shown at the learning rate the suite chose (the one it ran on every seed).

    python benchmarks/held_out.py [--results DIR] [--ablation DIR ...]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from yellowfin.bench import results as results_io
from yellowfin.bench.tasks import TABLE_ORDER

HERE = Path(__file__).resolve().parent
# (row label, results file's optimizer name, where: "suite" or "ablation")
# (The default is the primal-average form with the clip at its level since docs/tuner.md §20: the suite's "yellowfin"
# runs are yf_scale_free_dowg_clip_hold_primal_average's of benchmarks/results-clip-trigger, bit for bit.)
ROWS = (
    ("YellowFin default (primal-average form), the average of its gradient points (§24)", "yellowfin", "suite"),
    ("YellowFin primal-average form, its own average (the default from §20 to §23)",
     "yf_scale_free_dowg_clip_hold_primal_average", "ablation"),
    ("YellowFin heavy ball (the default before §20), its average", "yf_scale_free_dowg_clip_trigger_hold_average",
     "ablation"),
    ("YellowFin primal-average form, clip trigger 10, its average",
     "yf_scale_free_dowg_clip_trigger_hold_primal_average", "ablation"),
    ("YellowFin heavy ball, clip_trigger=2, its average", "yf_scale_free_dowg_clip_hold_average", "ablation"),
    ("YellowFin Adam's metric, last iterate", "yf_scale_free_adam_dowg_neutral_start_1e-2", "ablation"),
    ("YellowFin Adam's metric, its average", "yf_scale_free_adam_dowg_neutral_start_1e-2_average", "ablation"),
    ("YellowFin Adam's metric, primal-average form (its default since §21), its own average",
     "yf_scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average", "ablation"),
    ("YellowFin Adam's metric, primal-average form, the average of its gradient points (average=True)",
     "yf_scale_free_adam_dowg_neutral_start_1e-2_clip_primal_average_average", "ablation"),
    ("YellowFin reference, last iterate", "yellowfin_reference", "suite"),
    ("momentum SGD (tuned lr)", "sgd_momentum", "suite"),
    ("Adam (tuned lr)", "adam", "suite"),
    ("Schedule-Free SGD (its x)", "schedulefree_sgd", "suite"),
    ("Schedule-Free AdamW (its x)", "schedulefree_adamw", "suite"),
    ("Prodigy", "prodigy", "suite"),
    ("D-Adaptation Adam", "dadapt_adam", "suite"),
    ("DoG (its average)", "dog", "suite"),
)


def held_out(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(task, optimizer) -> the validation measures of its runs, for a tuned optimizer at the chosen lr only."""
    runs: dict[tuple[str, str, float | None], list[dict]] = defaultdict(list)
    for record in records:
        if record.get("diverged"):
            continue
        evaluation = record.get("eval") or {}
        measures = evaluation.get("val", evaluation)
        if measures:
            runs[(record["task"]["name"], record["optimizer"], record.get("lr"))].append(measures)
    chosen: dict[tuple[str, str], list[dict]] = {}
    for (task, optimizer, _), measures in sorted(runs.items(), key=lambda item: len(item[1])):
        chosen[(task, optimizer)] = measures  # (sorted by seed count: the chosen lr, run on every seed, is last)
    return chosen


def cell(measures: list[dict] | None, name: str) -> str:
    values = [m[name] for m in measures or () if name in m]
    if not values:
        return "–"
    spread = f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else f" ({len(values)} seed)"
    return f"{statistics.mean(values):.4g}{spread}"


def task_measure(suite: dict, task: str) -> str:
    """The task's own measure: the first one its evaluation reports besides the loss (the quadratic's excess loss
    is its loss, f(x) - f(x*))."""
    names = next(iter(m[0] for (t, _), m in suite.items() if t == task))
    return next((name for name in names if name != "loss"), "loss")


def table(suite: dict, ablation: dict, measure: str | None) -> str:
    """One row per optimizer, one column per task: the loss (measure None) or each task's own measure."""
    tasks = [t for t in TABLE_ORDER if any(task == t for task, _ in suite)]
    names = {t: measure or task_measure(suite, t) for t in tasks}
    header = tasks if measure else [f"{t} ({names[t]})" for t in tasks]
    lines = ["| optimizer, point handed out | " + " | ".join(header) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label, optimizer, where in ROWS:
        source = suite if where == "suite" else ablation
        lines.append(f"| {label} | " + " | ".join(cell(source.get((t, optimizer)), names[t]) for t in tasks) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--ablation", type=Path, nargs="+",
                        default=[HERE / "results-ablation", HERE / "results-primal-average",
                                 HERE / "results-clip-trigger", HERE / "results-adam-primal-average",
                                 HERE / "results-gradient-point-average"])
    args = parser.parse_args(argv)
    for directory in (args.results, *args.ablation):
        if not directory.is_dir():
            parser.error(f"{directory} is not a directory of results (see this script's docstring for the commands)")
    suite = held_out(results_io.load_results(args.results))
    ablation = held_out([record for directory in args.ablation for record in results_io.load_results(directory)])
    print("Validation loss at the point each optimizer hands out (mean ± std over seeds):\n")
    print(table(suite, ablation, "loss"))
    print("\nThe task's own measure there:\n")
    print(table(suite, ablation, None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
