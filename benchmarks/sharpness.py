"""Where in the stability range does each optimizer run? The top Hessian eigenvalue along training (issue 12).

Heavy-ball momentum (v <- mu v + g, x <- x - a v) is stable on a quadratic of curvature h iff a h < 2 (1 + mu).
This script trains a task with grid-tuned momentum SGD (mu = 0.9, the suite's chosen learning rate) or with a
YellowFin tuner, and every ``--every`` steps measures the largest Hessian eigenvalue lambda of the loss on the
current batch by power iteration on Hessian-vector products; it reports the *stability fraction*
a lambda / (2 (1 + mu)) (1 is the edge of stability) and, for the tuners, the secant curvature the tuner
measured and the step a/(1 - mu).

Why: the scale-free tuner sets a = (1 - sqrt mu)^2 kappa / h from a secant curvature h. If training drives the
sharpness up to whatever the step allows (Cohen et al. 2021, "edge of stability"), a rule that shrinks the step
when the measured curvature rises chases the sharpness down. The fractions below say whether that happens.

    python benchmarks/sharpness.py digits_mlp logreg autoencoder --steps 2000 --every 100
    python benchmarks/sharpness.py char_lstm --steps 1500 --every 250
    python benchmarks/sharpness.py --plot        # docs/figures/sharpness.png and the summary table, from the results
Writes benchmarks/results-sharpness/<task>/<optimizer>_seed<k>.json and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from yellowfin import YellowFin
from yellowfin.bench.report import pyplot, save_figure
from yellowfin.bench.results import finite_or_none, write_result
from yellowfin.bench.tasks import get_task

OUT = Path(__file__).resolve().parent / "results-sharpness"
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "sharpness.png"
TUNED_LR = {"quadratic": 3e-4, "digits_mlp": 0.1, "logreg": 3e-3, "char_lstm": 1.0, "autoencoder": 1.0,
            "fmnist_resnet": 0.03, "fmnist_resnet8": 0.1}  # the suite's grid choices (benchmarks/results)


def top_eigenvalue(model: torch.nn.Module, loss: torch.Tensor, iterations: int, seed: int) -> float:
    """The largest-magnitude eigenvalue of the batch loss's Hessian, by power iteration on Hessian-vector products."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    eigenvalue = 0.0
    for _ in range(iterations):
        norm = math.sqrt(sum(float((v * v).sum()) for v in vector))
        vector = [v / norm for v in vector]
        product = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)
        eigenvalue = sum(float((h * v).sum()) for h, v in zip(product, vector))  # Rayleigh quotient
        vector = [h.detach() for h in product]
    return eigenvalue


def run(task_name: str, optimizer_name: str, seed: int, steps: int, every: int, iterations: int) -> dict:
    task = get_task(task_name)
    model = task.make_model(seed)
    if optimizer_name == "sgd_momentum":
        optimizer = torch.optim.SGD(model.parameters(), lr=TUNED_LR[task_name], momentum=0.9)
    elif optimizer_name == "scale_free":
        # (the rule it measured, without the relative clip)
        optimizer = YellowFin(model.parameters(), tuner="scale_free", step_rule="secant", relative_clip=math.inf)
    elif optimizer_name == "reference":
        optimizer = YellowFin.reference_variant(model.parameters())
    else:
        raise ValueError(f"unknown optimizer {optimizer_name!r}: sgd_momentum, scale_free or reference")
    batches = task.train_batches(seed)
    records, losses = [], []
    # The secant along the last step, <g_t - g_(t-1), x_t - x_(t-1)> / ||x_t - x_(t-1)||^2, as running averages of
    # numerator and denominator (memory 0.99, no noise correction): what a tuner can see without extra gradients.
    params = [p for p in model.parameters() if p.requires_grad]
    previous, secant_num, secant_den = None, 0.0, 0.0
    for step in range(steps):
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        if step % every == 0 or step == steps - 1:
            sharpness = top_eigenvalue(model, loss, iterations, seed + step)
            lr, mu = _step_and_momentum(optimizer)
            record = {"step": step, "loss": float(loss.detach()), "sharpness": sharpness, "lr": lr, "mu": mu,
                      "stability_fraction": lr * sharpness / (2.0 * (1.0 + mu)),
                      "effective_lr": lr / (1.0 - mu)}
            if isinstance(optimizer, YellowFin):  # what the tuner itself measured (scale-free: its secant)
                record.update({key: value for key, value in optimizer.stats(0).items()
                               if key in ("h_min", "h_max", "secant_curvature", "distance", "grad_var")})
            record["secant"] = secant_num / secant_den if secant_den > 0.0 else math.nan
            records.append(record)
            print(f"{task_name} {optimizer_name} step {step}: loss {float(loss.detach()):.4g} lambda {sharpness:.4g} "
                  f"a {lr:.4g} mu {mu:.3f} a*lambda/(2(1+mu)) {record['stability_fraction']:.3g}"
                  + "".join(f" {key} {record[key]:.3g}" for key in ("secant", "secant_curvature", "h_min", "h_max")
                            if key in record), flush=True)
        loss.backward()
        with torch.no_grad():
            x = torch.cat([p.detach().reshape(-1) for p in params]).double()
            g = torch.cat([p.grad.reshape(-1) for p in params]).double()
            if previous is not None:
                dx, dg = x - previous[0], g - previous[1]
                secant_num = 0.99 * secant_num + 0.01 * float(dg.dot(dx))
                secant_den = 0.99 * secant_den + 0.01 * float(dx.dot(dx))
            previous = (x, g)
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"task": task_name, "optimizer": optimizer_name, "seed": seed, "steps": steps,
            "measurements": [{k: finite_or_none(v) for k, v in r.items()} for r in records],
            "losses": [finite_or_none(v) for v in losses]}


def _step_and_momentum(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """The step size and momentum the optimizer will apply next (for YellowFin: its current tuned values)."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, YellowFin):
        stats = optimizer.stats(0)
        return float(group["lr"]) * stats["alpha"], stats["applied_momentum"]
    return float(group["lr"]), float(group.get("momentum", 0.0))


def summary(records: list[dict]) -> str:
    """Medians over the measurements after the first quarter of each run (markdown)."""
    lines = ["| task | optimizer | top eigenvalue | a | mu | a / (1 - mu) | a lambda / (2 (1 + mu)) (max) "
             "| secant along the step, raw | the tuner's secant |", "|---" * 9 + "|"]
    for record in sorted(records, key=lambda r: (r["task"], r["optimizer"])):
        late = [m for m in record["measurements"]
                if m["step"] >= record["steps"] // 4 and m["sharpness"] is not None and m["lr"] is not None]

        def median(key: str) -> str:
            values = [m[key] for m in late if m.get(key) is not None]
            return f"{statistics.median(values):.3g}" if values else "-"

        worst = max((m["stability_fraction"] for m in late if m["stability_fraction"] is not None), default=math.nan)
        lines.append(f"| {record['task']} | {record['optimizer']} | {median('sharpness')} | {median('lr')} | "
                     f"{median('mu')} | {median('effective_lr')} | {median('stability_fraction')} ({worst:.3g}) | "
                     f"{median('secant')} | {median('secant_curvature')} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> Path:
    """Per task: the sharpness lambda and each optimizer's edge of stability 2 (1 + mu) / a, on one log axis."""
    plt = pyplot()
    tasks = sorted({r["task"] for r in records})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    colours = {"sgd_momentum": "tab:green", "scale_free": "tab:blue", "reference": "tab:orange"}
    for ax, task_name in zip(axes[0], tasks):
        for record in (r for r in records if r["task"] == task_name):
            points = [m for m in record["measurements"] if m["sharpness"] is not None and m["lr"]]
            steps = [m["step"] for m in points]
            colour = colours.get(record["optimizer"], "k")
            ax.plot(steps, [m["sharpness"] for m in points], color=colour, marker="o", markersize=3,
                    label=f"{record['optimizer']}: top eigenvalue")
            ax.plot(steps, [2.0 * (1.0 + m["mu"]) / m["lr"] for m in points], color=colour, linestyle="--",
                    label=f"{record['optimizer']}: edge 2(1+mu)/a")
        ax.set_yscale("log")
        ax.set_title(task_name, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("Sharpness (Hessian's top eigenvalue on the batch) against each optimizer's edge of stability")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="*")
    parser.add_argument("--plot", action="store_true", help="run nothing: draw every results file present")
    parser.add_argument("--optimizers", nargs="+", default=["sgd_momentum", "scale_free"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=20, help="power-iteration steps per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.plot:
        records = [json.loads(path.read_text()) for path in sorted(OUT.glob("*/*_seed*.json"))]
        if not records:
            parser.error(f"no results in {OUT}: run some tasks first")
        print(plot(records, FIGURE))
        print(summary(records))
        return 0
    if not args.tasks:
        parser.error("name at least one task, or --plot")
    torch.set_num_threads(1)
    for task_name in args.tasks:
        for optimizer_name in args.optimizers:
            start = time.monotonic()
            record = run(task_name, optimizer_name, args.seed, args.steps, args.every, args.iterations)
            record["seconds"] = time.monotonic() - start
            path = OUT / task_name / f"{optimizer_name}_seed{args.seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_result(path, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
