"""Compare YellowFin runs re-made with the current optimizer against the committed ones.

    python benchmarks/compare_recheck.py      # reads benchmarks/results and benchmarks/results-recheck

Prints, per task: the first step whose training loss differs by more than 1e-5 (relative), the best
smoothed training loss (1/40 of the budget, as in the report) and the final test metric of both runs.
"""

import json
from pathlib import Path

from yellowfin.bench import metrics

ROOT = Path(__file__).resolve().parents[1]


def best_smoothed(losses: list[float]) -> float:
    return metrics.best_point(metrics.smooth(losses))[0]


def main() -> None:
    print("| task | seed | steps equal to 1e-5 | best smoothed loss (committed / re-run) | test metric (committed / re-run) |")
    print("|---|---|---|---|---|")
    for path in sorted((ROOT / "benchmarks" / "results-recheck").glob("*/yellowfin_reference_*.json")):
        recheck = json.loads(path.read_text())
        committed = json.loads((ROOT / "benchmarks" / "results" / path.parent.name / path.name).read_text())
        a, b = committed["loss"], recheck["loss"]
        equal = next((i for i, (x, y) in enumerate(zip(a, b)) if abs(x - y) > 1e-5 * abs(x)), len(a))
        metric = next(k for k in committed["eval"]["test"] if k != "loss")
        print(f"| {path.parent.name} | {recheck['seed']} | {equal} of {len(a)} "
              f"| {best_smoothed(a):.4g} / {best_smoothed(b):.4g} "
              f"| {metric} {committed['eval']['test'][metric]:.4g} / {recheck['eval']['test'][metric]:.4g} |")


if __name__ == "__main__":
    main()
