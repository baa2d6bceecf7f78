"""Hogwild on the digits MLP: the library's default tuner (scale-free, DoWG's step) against the reference, closed loop.

4 worker processes on one shared-memory model, a fixed number of updates, seeds 0-2. Hogwild's tuner reads every
gradient a worker applies (docs/asynchrony.md, "Hogwild"), measures the shared model's distance for the scale-free
step, and the workers apply its clip. Writes benchmarks/asynchrony/hogwild_scale_free.json and prints per run: the
mean training loss of the last 50 updates (the workers' batch losses, in the order the tuner read them), the
validation loss at the end, the mean staleness, the fraction of applied gradients the tuner read, the final applied
momentum and step, and the updates per second (machine-dependent: a rough indication only).

    OMP_NUM_THREADS=1 python benchmarks/asynchrony/hogwild_scale_free.py
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import torch

from common import get_task, save_json
from yellowfin import YellowFin
from yellowfin.asynchrony import Hogwild

UPDATES, SEEDS, WORKERS = 2000, (0, 1, 2), 4
# (the library's default as measured, before DoWG's distance hold, docs/tuner.md §16)
TUNERS = {"reference": YellowFin.reference_variant,
          "scale_free": functools.partial(YellowFin, hold_distance_uphill=False)}


class TaskBatches:
    """batch_factory for the workers: each worker draws its own stream of batches (one torch thread each, set by
    the worker before it calls this)."""

    def __init__(self, task):
        self.task = task

    def __call__(self, worker_id, seed):
        return self.task.train_batches(seed)


def run(task, tuner: str, seed: int) -> dict:
    model = task.make_model(seed)
    hogwild = Hogwild(model, task.loss, TaskBatches(task), num_workers=WORKERS, tuner=TUNERS[tuner],
                      closed_loop=True, seed=seed)
    started = time.monotonic()
    with hogwild:
        report = hogwild.run(UPDATES, timeout=600)
    seconds = time.monotonic() - started
    losses = [record["loss"] for record in hogwild.trace]
    stats = hogwild.tuner.stats()
    return {"tuner": tuner, "seed": seed, "workers": WORKERS, "updates": report["version"],
            "tuned_gradients": report["tuned_gradients"],
            "tuned_fraction": report["tuned_gradients"] / report["version"],
            "final_loss": statistics.fmean(losses[-50:]), "val_loss": task.evaluate(model, "val")["loss"],
            "mean_staleness": report["mean_staleness"], "staleness_counts": report["staleness_counts"],
            "applied_momentum": report["mu"], "alpha": report["alpha"], "mu_target": stats["mu"],
            "mu_hat": report["mu_hat"], "distance": stats.get("distance"), "seconds": seconds,
            "updates_per_second": report["version"] / seconds, "losses": losses,
            "alphas": [record["alpha"] for record in hogwild.trace][::10]}


def main() -> int:
    torch.set_num_threads(1)
    task = get_task("digits_mlp")
    runs = []
    for seed in SEEDS:
        for tuner in TUNERS:
            result = run(task, tuner, seed)
            runs.append(result)
            print(f"{tuner:10s} seed {seed}: last-50 loss {result['final_loss']:.4f}, "
                  f"val loss {result['val_loss']:.4f}, staleness {result['mean_staleness']:.2f}, "
                  f"tuned {result['tuned_fraction']:.3f}, "
                  f"mu {result['applied_momentum']:.3f}, alpha {result['alpha']:.3g}, "
                  f"{result['updates_per_second']:.0f} updates/s", flush=True)
            save_json({"updates": UPDATES, "workers": WORKERS, "seeds": list(SEEDS), "runs": runs},
                      "hogwild_scale_free.json")
    print("\n| tuner | last-50 training loss (seeds 0, 1, 2) | validation loss | mean staleness | tuned fraction "
          "| updates/s |\n|---|---|---|---|---|---|")
    columns = (("final_loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("mean_staleness", "{:.2f}"),
               ("tuned_fraction", "{:.3f}"), ("updates_per_second", "{:.0f}"))
    for tuner in TUNERS:
        mine = [r for r in runs if r["tuner"] == tuner]
        cells = [", ".join(form.format(r[name]) for r in mine) for name, form in columns]
        print(f"| {tuner} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
