"""How far above the gradients before it each gradient is: the ratio the relative clip reads (docs/tuner.md §10).

The library's scale-free tuner with the clip off (``relative_clip=math.inf``), seeds 0-2: at each step, ||g_t||
over the root of the debiased running mean (memory 0.99) of ||g_s||^2 for s < t; prints the steps where it exceeds
1.8 (step indices from 0), for the char-LSTM's first 30 steps and the autoencoder's first 120.

    python benchmarks/gradient_ratios.py
"""

from __future__ import annotations

import math
import sys

import torch

from yellowfin import YellowFin
from yellowfin.bench.tasks import get_task

STEPS = {"char_lstm": 30, "autoencoder": 120}
SHOWN = 1.8


def ratios(task, seed: int, steps: int) -> list[tuple[int, float]]:
    torch.manual_seed(seed)
    model = task.make_model(seed)
    # (as measured, before the distance hold and the primal-average form)
    optimizer = YellowFin(model.parameters(), tuner="scale_free", relative_clip=math.inf,
                          hold_distance_uphill=False, momentum_form="heavy_ball")
    batches = task.train_batches(seed)
    mean_sq, weight, found = 0.0, 0.0, []
    for step in range(steps):
        optimizer.zero_grad()
        task.loss(model, next(batches)).backward()
        sq_norm = sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)
        if weight > 0.0 and math.sqrt(sq_norm / (mean_sq / weight)) > SHOWN:
            found.append((step, math.sqrt(sq_norm / (mean_sq / weight))))
        mean_sq, weight = 0.99 * mean_sq + 0.01 * sq_norm, 0.99 * weight + 0.01
        optimizer.step()
    return found


def main() -> int:
    torch.set_num_threads(1)
    for name, steps in STEPS.items():
        task = get_task(name)
        for seed in range(3):
            print(f"{name} seed {seed}: " + ", ".join(f"step {s}: {r:.2f}" for s, r in ratios(task, seed, steps)),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
