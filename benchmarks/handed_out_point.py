"""The point the primal-average form hands out: its own average xbar, or the average of its gradient points y.

The form (docs/algorithm.md §11) keeps z, a plain-SGD sequence, and xbar, z's polynomial average, and takes its
gradients at y = (1 - m) z + m xbar. Three points could be handed out after a run, all on the same trajectory: y (the
parameters), xbar (``average=False``: y - (1 - b) w from the buffer, no extra memory) and the polynomial average of
the y's (``average=True``, one more buffer; the plain metric's default since docs/tuner.md §24). This script trains
each metric's default once per task and seed and evaluates all three on the test split, where the model has batch
norm also after refreshing its statistics on 20 training batches (the bench's protocol for every averaged point). On
the noisy quadratic it splits the exact excess loss between the 90 flat directions (eigenvalues below 1) and the 10
stiff ones (30 to 60), where the gradient noise is largest.

    python benchmarks/handed_out_point.py [--tasks ...] [--seeds 0 1 2] [--metric plain|adam]

Each (task, metric, seed) is one JSON file under benchmarks/results-handed-out-point/ (an existing file is kept: the
script resumes); the table of means over the seeds goes to handed_out_point.md there.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from yellowfin import YellowFin
from yellowfin.bench.runner import BATCHNORM_REFRESH_BATCHES, refresh_batchnorm, environment
from yellowfin.bench.tasks import TABLE_ORDER, TASKS, get_task
from yellowfin.files import atomic_write

OUT_DIR = Path(__file__).resolve().parent / "results-handed-out-point"
METRICS = {"plain": {}, "adam": {"precondition": "adam"}}
POINTS = ("y", "xbar", "ybar")
LABELS = {"y": "y (the parameters)", "xbar": "the form's xbar (average=False)",
          "ybar": "the y's polynomial average (average=True)"}


def _has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def _points(model: torch.nn.Module, opt: YellowFin) -> dict[str, torch.nn.Module]:
    """The three candidate points as models (copies): xbar = y - (1 - b) w, b the last applied momentum."""
    kept_out = 1.0 - opt.stats()["applied_momentum"]
    xbar = copy.deepcopy(model)
    for p, q in zip(model.parameters(), xbar.parameters()):
        q.sub_(opt.state[p]["momentum_buffer"] * kept_out)
    with opt.averaged():
        ybar = copy.deepcopy(model)
    return {"y": copy.deepcopy(model), "xbar": xbar, "ybar": ybar}


def _quadratic_parts(task, model: torch.nn.Module) -> dict[str, float]:
    eigenvalues, vectors = torch.linalg.eigh(task.hessian)
    along = vectors.T @ (model.x.detach().double() - task.optimum)
    excess = 0.5 * eigenvalues * along ** 2
    return {"flat": float(excess[eigenvalues < 1.0].sum()), "stiff": float(excess[eigenvalues >= 1.0].sum())}


def run_one(task_name: str, metric: str, seed: int, steps: int | None, data_dir: str | None) -> dict:
    takes_data_dir = data_dir is not None and "data_dir" in TASKS[task_name].data_options
    task = get_task(task_name, **({"data_dir": data_dir} if takes_data_dir else {}))
    steps = steps or task.default_steps
    torch.manual_seed(seed)
    model = task.make_model(seed)
    model.train()
    # (each metric's default trajectory; the average kept to be handed out, as the plain metric's default keeps it)
    opt = YellowFin(model.parameters(), average=True, **METRICS[metric])
    assert opt.param_groups[0]["momentum_form"] == "primal_average"
    batches = task.train_batches(seed)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, next(batches))
        loss.backward()
        opt.step()
    record = {"task": task_name, "metric": metric, "seed": seed, "steps": steps, "final_train_loss": loss.item(),
              "train_seconds": time.perf_counter() - start, "stats": opt.stats(), "test": {}}
    for name, point in _points(model, opt).items():
        record["test"][name] = task.evaluate(point, "test")
        if _has_batchnorm(point):
            refresh_batchnorm(task, point, seed)
            record["test"][name + "+refreshed"] = task.evaluate(point, "test")
        if task_name == "quadratic":
            record["test"][name].update(_quadratic_parts(task, point))
    record["environment"] = environment()
    record["command"] = " ".join(["python", "benchmarks/handed_out_point.py", *sys.argv[1:]])
    return record


def write_table(out: Path) -> str:
    records = [json.loads(path.read_text()) for path in sorted(out.glob("*/*.json"))]
    lines = ["Test split at the end of each metric's default run (mean over seeds, min to max in brackets); the same",
             "trajectory, three points handed out. With batch norm: after refreshing its statistics on "
             f"{BATCHNORM_REFRESH_BATCHES} training batches.", ""]
    for metric in METRICS:
        for task in TABLE_ORDER:
            runs = [r for r in records if r["task"] == task and r["metric"] == metric]
            if not runs:
                continue
            seeds = ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
            keys = [k for k in runs[0]["test"]["y"] if k != "distance" and not (k == "loss" and task == "quadratic")]
            suffix = "+refreshed" if "y+refreshed" in runs[0]["test"] else ""
            lines += [f"#### {metric} metric, {task} ({runs[0]['steps']} steps, seeds {seeds})", "",
                      "| point | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for point in POINTS:
                cells = []
                for key in keys:
                    values = [r["test"][point + suffix][key] for r in runs]
                    cells.append(f"{statistics.fmean(values):.4g} [{min(values):.4g}, {max(values):.4g}]")
                lines.append(f"| {LABELS[point]} | " + " | ".join(cells) + " |")
            lines.append("")
    text = "\n".join(lines)
    atomic_write(out / "handed_out_point.md", lambda f: f.write(text), text=True)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TABLE_ORDER), choices=list(TABLE_ORDER))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--metric", choices=list(METRICS), default="plain")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: each task's budget)")
    parser.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for task in args.tasks:
        for seed in args.seeds:
            path = args.out / task / f"{args.metric}_seed{seed}.json"
            if path.exists():
                print(f"{task} {args.metric} seed {seed}: kept ({path})", flush=True)
                continue
            record = run_one(task, args.metric, seed, args.steps, args.data_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: json.dump(record, f, indent=1), text=True)
            summary = {point: round(next(iter(values.values())), 5) for point, values in record["test"].items()}
            print(f"{task} {args.metric} seed {seed} ({record['train_seconds']:.0f} s): {summary}", flush=True)
    print(write_table(args.out))


if __name__ == "__main__":
    main()
