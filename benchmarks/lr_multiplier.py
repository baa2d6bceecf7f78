"""How a constant lr multiplier acts on the default tuner's effective step (docs/algorithm.md §8, "The lr
multiplier").

The default tuner's step is calibrated on the distance the run travels, which the multiplier also slows, so a factor
c on alpha does not end at c times the effective step. The digits MLP, 600 steps, YellowFin(params, lr=c) for
c in {1, 1/2, 1/4}: the mean of the applied effective step c alpha / (1 - mu) over the last 100 steps, as a fraction
of c = 1's, per seed.

    python benchmarks/lr_multiplier.py [--seeds 0 1]
Writes benchmarks/results-lr-multiplier/lr_multiplier.json. Seconds of CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from yellowfin import YellowFin
from yellowfin.bench.tasks import get_task

FACTORS = (1.0, 0.5, 0.25)
STEPS, LAST = 600, 100
OUT = Path(__file__).resolve().parent / "results-lr-multiplier" / "lr_multiplier.json"


def settled_effective_step(task, factor: float, seed: int) -> float:
    torch.manual_seed(seed)
    model = task.make_model(seed)
    # (as measured, before the distance hold and the primal-average form)
    optimizer = YellowFin(model.parameters(), lr=factor, hold_distance_uphill=False, momentum_form="heavy_ball")
    batches = task.train_batches(seed)
    steps = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        task.loss(model, next(batches)).backward()
        optimizer.step()
        stats = optimizer.stats()
        steps.append(factor * stats["alpha"] / (1.0 - stats["mu"]))
    return statistics.mean(steps[-LAST:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    task = get_task("digits_mlp")
    fractions = {}
    for seed in args.seeds:
        settled = {factor: settled_effective_step(task, factor, seed) for factor in FACTORS}
        fractions[seed] = {str(factor): settled[factor] / settled[1.0] for factor in FACTORS}
        print(f"seed {seed}: " + ", ".join(f"lr={factor:g}: {fractions[seed][str(factor)]:.3f}" for factor in FACTORS))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python benchmarks/lr_multiplier.py", "task": "digits_mlp", "steps": STEPS,
                               "last": LAST, "fraction_of_lr_1": fractions}, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
