"""The scale-free tuner under simulated staleness: why its step must be cut for the gradients' delay, and the
closed loop with the cut.

The library runs ``tuner="scale_free"`` with more than one worker only with its step cut to 1 / sqrt(1 + mean
staleness) and the closed loop on (yellowfin.tuned.refuse_under_asynchrony); this experiment, which is the reason,
lifts the refusal inside the staleness simulator only. Digits MLP, 600 steps, geometric (or ``--schedule fixed``:
round-robin, tau = M - 1) staleness with M = 1, 4, 8 workers (``--workers``), seeds 0-2, ways to run the step:

- ``open`` / ``closed``: uncut, as in synchronous training, without and with the closed-loop momentum controller
  (the sensor's total momentum steered to the tuner's mu);
- ``open_lr_over_m`` / ``closed_lr_over_m``: the step divided by M (lr = 1/M), the "asynchrony multiplies the step
  by about M" model compensated open-loop;
- ``open_sensed_step`` / ``closed_sensed_step``: lr set each step to (1 - sensed total momentum) / (1 - applied
  momentum), the ratio of the commanded to the realized effective step as the momentum sensor measures it;
- ``open_cut`` / ``closed_cut``: the library's cut of the step for the mean staleness the simulator reports
  (``YellowFin.set_staleness``); ``closed_cut`` is what the library runs;
- ``closed_cut_expected`` (a screen, docs/tuner.md §15.1): ``closed_cut`` with the reported staleness never below
  the delay the schedule is expected to bring, M - 1, so that the cut acts from the first update;

and the reference with its closed loop, for comparison. Writes benchmarks/asynchrony/scale_free_staleness*.json and
prints the mean loss over the last 50 steps, the final applied momentum and effective step alpha / (1 - m).

``--rule default`` runs the scale-free tuner's defaults as they were then (DoWG's step with the relative clip of the
update acting at its own level) in place of the DoG rule as first measured; ``--rule today`` today's defaults (the
clip's trigger at 1 / sqrt(1 - beta) times the running RMS, but under staleness the clip acts at its own level);
``--rule trigger`` the same with the trigger kept under staleness, the measurement behind that exception; ``--rule
adam`` the preconditioned tuner (``precondition="adam"``) with DoG's rule, ``--rule adam_neutral`` with the neutral
DoWG rule (``step_rule="dowg_neutral"``) from the first move 1e-3 as measured, ``--rule adam_default`` Adam's
metric's defaults (the neutral rule from the first move 1e-2), ``--rule held`` the plain metric's defaults since DoWG's
distance hold (docs/tuner.md §16; ``today`` and the others pin the hold off, as they were measured).

``--estimate instant`` steers the closed loops by the sensor's per-observation estimate (an average of each
observation's median ratio, which forgets the largest moves) instead of its default time-averaged one, for the
closed-loop runs only (scale_free_staleness_instant.json).

    python benchmarks/asynchrony/scale_free_staleness.py
    python benchmarks/asynchrony/scale_free_staleness.py --estimate instant
    python benchmarks/asynchrony/scale_free_staleness.py --rule default --configs reference_closed open closed \\
        open_lr_over_m closed_lr_over_m
    python benchmarks/asynchrony/scale_free_staleness.py --rule default --workers 1 4 8 16 --configs \\
        reference_closed open open_cut closed_cut --tag cut          (and --schedule fixed; --rule adam)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

import yellowfin.asynchrony.simulator as simulator
from yellowfin import YellowFin, tuning
from yellowfin.asynchrony import MomentumSensor, StalenessSimulator
from yellowfin.bench.tasks import get_task

from common import report_at_least_the_expected_delay, save_json

STEPS, SEEDS, WORKERS = 600, (0, 1, 2), (1, 4, 8)
# (each plain-metric rule in heavy ball, as measured before the primal-average form became the synchronous default:
# with one worker it would run in that form)
RULES = {"dog": dict(tuner="scale_free", step_rule="dog", relative_clip=math.inf),  # (as first measured)
         # the defaults when first measured: the relative clip acted at its own level (clip_trigger=2)
         "default": dict(tuner="scale_free", relative_clip=2.0, clip_trigger=2.0, hold_distance_uphill=False),
         # today's defaults: the clip's trigger at 1 / sqrt(1 - beta) in synchronous training, its own level under
         # staleness; "trigger" keeps the trigger under staleness too (the measurement behind that exception); both
         # as measured, before DoWG's distance hold (docs/tuner.md §16), which "held" adds: the defaults since
         "today": dict(tuner="scale_free", hold_distance_uphill=False),
         "trigger": dict(tuner="scale_free", hold_distance_uphill=False),
         "held": dict(tuner="scale_free")}
for _options in RULES.values():
    _options["momentum_form"] = "heavy_ball"
STALENESS_BLIND_CLIP = ("trigger",)  # rules whose clip is run as if the gradients were fresh
RULES["adam"] = dict(tuner="scale_free", precondition="adam", step_rule="dog")  # (its rule when first measured)
# (the neutral rule as measured, from the first move 1e-3; "adam_default" is Adam's metric's default since, from 1e-2)
RULES["adam_neutral"] = dict(tuner="scale_free", precondition="adam", step_rule="dowg_neutral", initial_distance=1e-3)
RULES["adam_default"] = dict(tuner="scale_free", precondition="adam")
CONFIGS = {  # name: (scale-free tuner or the reference (None), closed loop, the step under staleness)
    "reference_closed": (None, True, "as_is"),
    "open": ("scale_free", False, "uncut"),
    "closed": ("scale_free", True, "uncut"),
    "open_lr_over_m": ("scale_free", False, "lr_over_m"),
    "closed_lr_over_m": ("scale_free", True, "lr_over_m"),
    "open_sensed_step": ("scale_free", False, "sensed"),
    "closed_sensed_step": ("scale_free", True, "sensed"),
    "open_cut": ("scale_free", False, "cut"),
    "closed_cut": ("scale_free", True, "cut"),
    # a screen: the cut from the first update for the delay the schedule is expected to bring (M - 1), where the
    # library's systems report the mean of the delays applied so far (0 at the first update)
    "closed_cut_expected": ("scale_free", True, "cut_expected"),
}


def run(task, config: str, workers: int, seed: int, rule: str = "dog", schedule: str = "geometric") -> dict:
    tuner, closed, step = CONFIGS[config]
    options = RULES[rule] if tuner else None
    torch.manual_seed(seed)
    model = task.make_model(seed)
    if options is None:
        optimizer = YellowFin.reference_variant(model.parameters())
    else:
        optimizer = YellowFin(model.parameters(), **options, lr=1.0 / workers if step == "lr_over_m" else 1.0)
    if step == "cut_expected":
        report_at_least_the_expected_delay(optimizer, workers - 1.0)
    elif step != "cut":  # (the step as measured before the library cut it: the simulator's report goes nowhere)
        optimizer.set_staleness = lambda mean_staleness, scope=None: None
    sensors = []
    if step == "sensed" and not closed:
        sensors = [MomentumSensor(sum(p.numel() for p in model.parameters()), 512, seed=seed)]
    sim = StalenessSimulator(model, optimizer, workers, schedule, seed=seed, closed_loop=closed and workers > 1,
                             sensors=sensors, trace_every=10)
    batches, losses = task.train_batches(seed), []
    for _ in range(STEPS):
        loss = sim.step(task.loss, next(batches))
        if step == "sensed" and sim.sensors[0].observations >= 20:
            sensed, applied = sim.sensors[0].estimate, float(optimizer.stats()["applied_momentum"])
            if math.isfinite(sensed):  # (the commanded over the realized effective step, kept in [1e-3, 1])
                optimizer.param_groups[0]["lr"] = min(1.0, max(1e-3, (1.0 - sensed) / (1.0 - applied)))
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
                        help="the scale-free tuner's options: the DoG rule as first measured, its defaults, "
                             "or Adam's metric")
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=None,
                        help="run these configurations only")
    parser.add_argument("--tag", default="", help="appended to the results file's name")
    parser.add_argument("--schedule", choices=("geometric", "fixed"), default="geometric",
                        help="the staleness: geometric with mean M - 1, or round-robin (tau = M - 1)")
    parser.add_argument("--workers", nargs="+", type=int, default=list(WORKERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    simulator.refuse_under_asynchrony = lambda *args, **kwargs: None  # this experiment only: see above
    if args.rule in STALENESS_BLIND_CLIP:  # (this process only: the clip as if every gradient were fresh)
        clipping_scales = tuning.clipping_scales
        tuning.clipping_scales = lambda *args, **kwargs: clipping_scales(*args[:5], staleness=0.0)
    configs = CONFIGS
    if args.estimate == "instant":  # (a property of the sensor class: this process only)
        MomentumSensor.estimate = property(lambda sensor: sensor.instant)
        configs = [name for name in CONFIGS if CONFIGS[name][1]]
    if args.configs:
        configs = [name for name in configs if name in args.configs]
    task = get_task("digits_mlp")
    runs = []
    for workers in args.workers:
        for config in configs:
            if workers == 1 and (args.estimate == "instant" or config not in ("reference_closed", "open")):
                continue  # (one worker: no staleness, nothing to compensate, no loop to close)
            for seed in SEEDS:
                runs.append(run(task, config, workers, seed, args.rule, args.schedule))
                print(f"M={workers} {config} seed {seed}: final loss {runs[-1]['final_loss']:.4g}", flush=True)
    name = "scale_free_staleness" + ("" if args.estimate == "averaged" else "_instant") + (
        "" if args.rule == "dog" else f"_{args.rule}") + ("" if args.schedule == "geometric" else "_fixed") + (
        f"_{args.tag}" if args.tag else "") + ".json"
    save_json({"task": "digits_mlp", "steps": STEPS, "estimate": args.estimate, "rule": args.rule,
               "schedule": args.schedule, "configs": list(configs), "runs": runs}, name)
    print("\n| workers | run | final loss (mean of last 50 steps), per seed | applied momentum | effective step |")
    print("|---|---|---|---|---|")
    for workers in args.workers:
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
