"""The iterate average on the noisy quadratic, as a figure (docs/tuner.md §9).

Reads the runs that are already stored, three seeds each where they exist: tuned momentum SGD at the iterate
(benchmarks/results) and at its polynomial average (benchmarks/results-tuner-screen, ``tuned_sgd_poly_avg``), the
DoG rule in both metrics at the iterate and at the average (the library's ablation runs, benchmarks/results-ablation),
and DoG at its own average (one seed). Draws the exact excess loss f(x) - f(x*) of the point each one hands out,
per step (mean over seeds, log scale), into docs/figures/iterate-average-quadratic.png, and prints the final values.

    python benchmarks/iterate_average.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURE = HERE.parent / "docs" / "figures" / "iterate-average-quadratic.png"
CURVES = [  # label, glob under benchmarks/, colour, dashed (at the average)
    ("tuned momentum SGD", "results/quadratic/sgd_momentum_lr0.0003_seed*_steps3000.json", "tab:gray", False),
    ("tuned momentum SGD, averaged", "results-tuner-screen/quadratic/tuned_sgd_poly_avg_seed*.json", "tab:gray", True),
    ("DoG rule (tuner='scale_free')", "results-ablation/quadratic/yf_scale_free_dog_seed*_steps3000.json",
     "tab:blue", False),
    ("DoG rule, averaged (average=True)",
     "results-ablation/quadratic/yf_scale_free_dog_average_seed*_steps3000.json", "tab:blue", True),
    ("DoG rule in Adam's metric", "results-ablation/quadratic/yf_scale_free_adam_seed*_steps3000.json",
     "tab:orange", False),
    ("DoG rule in Adam's metric, averaged",
     "results-ablation/quadratic/yf_scale_free_adam_average_seed*_steps3000.json", "tab:orange", True),
    ("DoG with its average (1 seed)", "results/quadratic/dog_seed0_steps3000.json", "tab:green", True),
]


def mean_curve(pattern: str) -> tuple[list[float], int]:
    runs = [json.loads(path.read_text())["exact_loss"] for path in sorted(HERE.glob(pattern))]
    if not runs:
        raise FileNotFoundError(f"no runs match benchmarks/{pattern}: run the commands in docs/tuner.md §9 first")
    return [statistics.mean(values) for values in zip(*runs)], len(runs)


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, pattern, colour, dashed in CURVES:
        curve, seeds = mean_curve(pattern)
        ax.plot(range(1, len(curve) + 1), curve, color=colour, linestyle="--" if dashed else "-", linewidth=1.2,
                label=f"{label}: {curve[-1]:.3g}")
        print(f"{label} ({seeds} seeds): final exact excess loss {curve[-1]:.4g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("exact excess loss f(x) - f(x*) of the point handed out")
    ax.set_title("Noisy quadratic: iterates (solid), their t^8-weighted average (dashed)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)
    print(f"figure: {FIGURE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
