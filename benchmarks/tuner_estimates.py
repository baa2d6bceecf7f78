"""The tuner's estimates against the true values, on the noisy quadratic where every one is known (issue 12).

Runs the scale-free tuner (memory 0.99, the screen's better memory) and the faithful reference on the suite's
``quadratic`` task and records, every step, what each tuner measured beside the truth computed from the task's
Hessian H, optimum x* and noise (docs/tuner.md §6):

- curvature: the scale-free tuner's secant (its h_max) against the Rayleigh quotient of H along the step it
  measured, dx^T H dx / ||dx||^2, and against H's extreme eigenvalues;
- distance: its DoG distance max ||x_t - x_0|| against the distance still to go, ||x - x*||;
- variance: the estimate C against the true trace of the gradient's covariance, noise^2 tr(H^2) / batch;
- mu, and the effective step alpha / (1 - mu) against tuned momentum SGD's (lr 3e-4, mu 0.9: 3e-3).

    python benchmarks/tuner_estimates.py [--steps 3000] [--seed 0]

Writes benchmarks/results-tuner-estimates/quadratic_seed<k>.json and docs/figures/tuner-estimates-quadratic.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from yellowfin import YellowFin
from yellowfin.bench.report import pyplot, save_figure
from yellowfin.bench.results import finite_or_none
from yellowfin.bench.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results-tuner-estimates"
FIGURE = ROOT / "docs" / "figures" / "tuner-estimates-quadratic.png"
TUNED_SGD_EFFECTIVE_STEP = 3e-4 / (1 - 0.9)  # the suite's grid choice on this task (docs/benchmarks.md)
TUNERS = {
    "scale_free_beta_0.99": lambda params: YellowFin(params, tuner="scale_free", step_rule="secant",
                                                     relative_clip=math.inf, beta=0.99),
    "reference": lambda params: YellowFin.reference_variant(params),
}


def run(tuner: str, steps: int, seed: int) -> dict[str, list]:
    task = get_task("quadratic")
    model = task.make_model(seed)
    optimizer = TUNERS[tuner](model.parameters())
    batches = task.train_batches(seed)
    hessian = task.hessian
    true_variance = task.noise**2 * float((hessian @ hessian).trace()) / task.batch_size
    trace: dict[str, list] = {key: [] for key in (
        "mu", "alpha", "effective_step", "secant", "rayleigh_along_step", "distance", "distance_to_go",
        "grad_var", "excess_loss")}
    # (the reference has no distance in parameter units: its D is in [x] / [f]; only the scale-free one is drawn)
    previous = model.x.detach().double().clone()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, next(batches)).backward()
        optimizer.step()
        x = model.x.detach().double()
        step, previous = x - previous, x.clone()
        stats = optimizer.stats()
        mu, alpha = stats["mu"], stats["alpha"]
        rayleigh = float(step @ hessian @ step / (step @ step)) if float(step @ step) > 0 else float("nan")
        for key, value in (("mu", mu), ("alpha", alpha), ("effective_step", alpha / (1.0 - mu)),
                           ("secant", stats.get("secant_curvature", float("nan"))),
                           ("rayleigh_along_step", rayleigh), ("distance", stats.get("distance", float("nan"))),
                           ("distance_to_go", float((x - task.optimum).norm())), ("grad_var", stats["grad_var"]),
                           ("excess_loss", task.exact_loss(model))):
            trace[key].append(finite_or_none(value))
    return {"tuner": tuner, "seed": seed, "steps": steps, "true_variance": true_variance,
            "eigenvalues": [float(task.eigenvalues.min()), float(task.eigenvalues.max())],
            "tuned_sgd_effective_step": TUNED_SGD_EFFECTIVE_STEP, "trace": trace}


def plot(records: dict[str, dict], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    steps = range(1, next(iter(records.values()))["steps"] + 1)
    colours = {"scale_free_beta_0.99": "tab:blue", "reference": "tab:orange"}
    some = next(iter(records.values()))
    panels = [
        (axes[0, 0], "mu", "momentum mu", False),
        (axes[0, 1], "effective_step", "effective step alpha / (1 - mu)", True),
        (axes[0, 2], "excess_loss", "exact excess loss f(x) - f(x*)", True),
        (axes[1, 1], "distance", "distance: the scale-free tuner's max ||x - x0||", True),
        (axes[1, 2], "grad_var", "gradient variance C", True),
    ]
    for ax, key, title, log in panels:
        for tuner, record in records.items():
            ax.plot(steps, [v if v is not None else float("nan") for v in record["trace"][key]],
                    color=colours[tuner], label=tuner, linewidth=1)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
    axes[0, 1].axhline(some["tuned_sgd_effective_step"], color="k", linestyle="--", linewidth=1,
                       label="tuned momentum SGD")
    axes[1, 1].plot(steps, some["trace"]["distance_to_go"], color="k", linestyle="--", linewidth=1,
                    label="true ||x - x*||")
    axes[1, 2].axhline(some["true_variance"], color="k", linestyle="--", linewidth=1, label="true tr Cov(g)")
    axes[1, 2].set_ylim(bottom=some["true_variance"] / 100)  # (the first steps' estimates start near zero)
    if "scale_free_beta_0.99" in records:
        trace = records["scale_free_beta_0.99"]["trace"]
        ax = axes[1, 0]
        ax.plot(steps, [v if v is not None else float("nan") for v in trace["secant"]], color="tab:blue",
                linewidth=1, label="secant (scale-free's h_max)")
        ax.plot(steps, [v if v is not None else float("nan") for v in trace["rayleigh_along_step"]], color="k",
                linewidth=0.6, alpha=0.5, label="true dx^T H dx / ||dx||^2")
        low, high = some["eigenvalues"]
        for value, name in ((low, "H's smallest eigenvalue"), (high, "H's largest eigenvalue")):
            ax.axhline(value, color="grey", linestyle=":", linewidth=1, label=name)
        ax.set_yscale("log")
        ax.set_title("curvature along the step (0 or below: unmeasured, not drawn)", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("iteration", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"Noisy quadratic (seed {some['seed']}): the tuners' estimates against the true values")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(1)
    records = {}
    for tuner in TUNERS:
        records[tuner] = run(tuner, args.steps, args.seed)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"quadratic_{tuner}_seed{args.seed}.json").write_text(json.dumps(records[tuner]) + "\n")
        final = records[tuner]["trace"]["excess_loss"][-1]
        print(f"{tuner}: final exact excess loss {final:.4g}", flush=True)
    print(f"wrote {plot(records, FIGURE)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
