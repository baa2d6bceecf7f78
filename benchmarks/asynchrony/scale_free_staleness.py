"""Why the asynchronous systems refuse the scale-free tuner: its DoG rule under simulated staleness.

The library refuses ``tuner="scale_free"`` with more than one worker (yellowfin.tuned.refuse_under_asynchrony); this
experiment, which is the reason, lifts the refusal inside the staleness simulator only. Digits MLP, 600 steps,
geometric staleness with M = 1, 4, 8 workers, seeds 0-2, four ways to run the DoG rule:

- ``open``: as in synchronous training;
- ``closed``: with the closed-loop momentum controller (the sensor's total momentum steered to the tuner's mu);
- ``open_lr_over_m`` / ``closed_lr_over_m``: the same with the step divided by M (lr = 1/M), the "asynchrony
  multiplies the step by about M" model compensated open-loop;

and the reference with its closed loop, for comparison. Writes benchmarks/asynchrony/scale_free_staleness.json and
prints the mean loss over the last 50 steps, the final applied momentum and effective step alpha / (1 - m).

``--rule default`` runs the scale-free tuner's defaults (DoWG's step with the relative clip of the update) in place
of the DoG rule (scale_free_staleness_default.json).

``--estimate instant`` steers the closed loops by the sensor's per-observation estimate (an average of each
observation's median ratio, which forgets the largest moves) instead of its default time-averaged one, for the
closed-loop runs only (scale_free_staleness_instant.json).

    python benchmarks/asynchrony/scale_free_staleness.py
    python benchmarks/asynchrony/scale_free_staleness.py --estimate instant
    python benchmarks/asynchrony/scale_free_staleness.py --rule default
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

import yellowfin.asynchrony.simulator as simulator
from yellowfin import YellowFin
from yellowfin.asynchrony import MomentumSensor, StalenessSimulator
from yellowfin.bench.tasks import get_task

from common import save_json

STEPS, SEEDS, WORKERS = 600, (0, 1, 2), (1, 4, 8)
RULES = {"dog": dict(tuner="scale_free", step_rule="dog", relative_clip=math.inf),  # (as first measured)
         "default": dict(tuner="scale_free")}
CONFIGS = {  # name: (scale-free tuner or the reference (None), closed loop, step divided by M)
    "reference_closed": (None, True, False),
    "open": ("scale_free", False, False),
    "closed": ("scale_free", True, False),
    "open_lr_over_m": ("scale_free", False, True),
    "closed_lr_over_m": ("scale_free", True, True),
}


def run(task, config: str, workers: int, seed: int, rule: str = "dog") -> dict:
    tuner, closed, divide = CONFIGS[config]
    options = RULES[rule] if tuner else None
    torch.manual_seed(seed)
    model = task.make_model(seed)
    if options is None:
        optimizer = YellowFin.reference_variant(model.parameters())
    else:
        optimizer = YellowFin(model.parameters(), **options, lr=1.0 / workers if divide else 1.0)
    sim = StalenessSimulator(model, optimizer, workers, "geometric", seed=seed, closed_loop=closed and workers > 1,
                             trace_every=10)
    batches, losses = task.train_batches(seed), []
    for _ in range(STEPS):
        loss = sim.step(task.loss, next(batches))
        losses.append(loss)
        if not math.isfinite(loss) or loss > 1e6:
            break
    stats = optimizer.stats()
    applied = stats["applied_momentum"]
    tail = losses[-50:]
    return {"config": config, "workers": workers, "seed": seed, "losses": losses,
            "final_loss": sum(tail) / len(tail), "completed_steps": len(losses), "mu": stats["mu"],
            "applied_momentum": applied,
            "effective_step": optimizer.param_groups[0]["lr"] * stats["alpha"] / (1.0 - applied),
            "sensed_momentum": [record.get("mu_hat_0") for record in sim.trace]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimate", choices=("averaged", "instant"), default="averaged",
                        help="the sensor estimate that the closed loops steer by")
    parser.add_argument("--rule", choices=tuple(RULES), default="dog",
                        help="the scale-free tuner's options: the DoG rule as first measured, or its defaults")
    args = parser.parse_args()
    torch.set_num_threads(1)
    simulator.refuse_under_asynchrony = lambda optimizer, num_workers: None  # this experiment only: see above
    configs = CONFIGS
    if args.estimate == "instant":  # (a property of the sensor class: this process only)
        MomentumSensor.estimate = property(lambda sensor: sensor.instant)
        configs = [name for name in CONFIGS if CONFIGS[name][1]]
    task = get_task("digits_mlp")
    runs = []
    for workers in WORKERS:
        for config in configs:
            if workers == 1 and (args.estimate == "instant" or config not in ("reference_closed", "open")):
                continue  # (one worker: no staleness, nothing to compensate, no loop to close)
            for seed in SEEDS:
                runs.append(run(task, config, workers, seed, args.rule))
                print(f"M={workers} {config} seed {seed}: final loss {runs[-1]['final_loss']:.4g}", flush=True)
    name = "scale_free_staleness" + ("" if args.estimate == "averaged" else "_instant") + (
        "" if args.rule == "dog" else f"_{args.rule}") + ".json"
    save_json({"task": "digits_mlp", "steps": STEPS, "estimate": args.estimate, "rule": args.rule, "runs": runs},
              name)
    print("\n| workers | run | final loss (mean of last 50 steps), per seed | applied momentum | effective step |")
    print("|---|---|---|---|---|")
    for workers in WORKERS:
        for config in configs:
            group = [r for r in runs if r["workers"] == workers and r["config"] == config]
            if group:
                losses = ", ".join(f"{r['final_loss']:.3g}" for r in group)
                print(f"| {workers} | {config} | {losses} | "
                      f"{statistics.mean(r['applied_momentum'] for r in group):.2f} | "
                      f"{statistics.mean(r['effective_step'] for r in group):.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
