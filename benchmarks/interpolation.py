"""A small classifier trained to interpolation: does the tuner stay stable once the training loss goes to zero?

A 20-64-4 tanh MLP on 256 Gaussian points labelled by a random linear teacher (separable), cross-entropy,
batch 32, 3000 steps. Near an interpolating solution the weights grow, the landscape flattens along the step and
the gradients become rare spikes from the few examples still misclassified. Grid-tuned optimizers and the reference
tuner handle that; the scale-free tuner of docs/algorithm.md §8 did not (docs/tuner.md §8), which this script
shows in one command.

    python benchmarks/interpolation.py [--seeds 0 1 2] [--steps 3000] [--optimizers NAME ...]
Optimizers: the names below, or screen:VARIANT for a research variant of benchmarks/tuner_screen.py.
Writes benchmarks/results-interpolation/<optimizer>.json: per seed, the final full-batch loss, the largest batch
loss after the first 200 steps, and the step at which a batch loss first exceeded 10 (or None).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from yellowfin import YellowFin
from yellowfin.bench.results import finite_or_none

OUT = Path(__file__).resolve().parent / "results-interpolation"
# The plain metric's rules in heavy ball, the form every entry below that names none was measured in (before the
# primal-average form became the default, docs/tuner.md §19).
HeavyBall = functools.partial(YellowFin, momentum_form="heavy_ball")
OPTIMIZERS = {
    # (the rules as measured, before the relative clip; "scale_free" is DoG's rule, its name from before DoWG)
    "scale_free": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dog", relative_clip=math.inf),
    "scale_free_secant": lambda params: HeavyBall(params, tuner="scale_free", step_rule="secant",
                                                  relative_clip=math.inf),
    "scale_free_dowg": lambda params: YellowFin(params, tuner="scale_free", step_rule="dowg", relative_clip=math.inf,
                                                hold_distance_uphill=False),
    # the preconditioned tuner with each of its rules (the neutral DoWG rule is its default, docs/tuner.md §12), in
    # heavy ball as measured (its default form since §21 is the primal-average one)
    "scale_free_adam_dog": lambda params: YellowFin(params, precondition="adam", step_rule="dog",
                                                    momentum_form="heavy_ball"),
    "scale_free_adam_dowg_neutral": lambda params: YellowFin(params, precondition="adam", step_rule="dowg_neutral",
                                                             initial_distance=1e-3, momentum_form="heavy_ball"),
    # the defaults with their relative clip (docs/tuner.md §10), DoWG's and the neutral rule in the plain metric, and
    # each metric's with the larger first move of §14 (DoWG's as measured, before its distance hold)
    "scale_free_dowg_clip": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dowg",
                                                     initial_distance=1e-3, hold_distance_uphill=False),
    "scale_free_dowg_clip_start_1e-2": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dowg",
                                                                initial_distance=1e-2, hold_distance_uphill=False),
    # DoWG's step held to linear growth from step 100 on (growth_cap, docs/tuner.md §15)
    "scale_free_dowg_clip_growth_cap": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dowg",
                                                                initial_distance=1e-3, growth_cap=True,
                                                                hold_distance_uphill=False),
    # the distance held where the loss rises along the way travelled (hold_distance_uphill, docs/tuner.md §16): the
    # plain metric's default since
    "scale_free_dowg_clip_hold": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dowg",
                                                          initial_distance=1e-3, hold_distance_uphill=True),
    "scale_free_dowg_clip_hold_start_1e-2": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dowg",
                                                                     initial_distance=1e-2, hold_distance_uphill=True),
    "scale_free_dowg_neutral_clip": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dowg_neutral",
                                                             initial_distance=1e-3),
    # the neutral rule times sqrt(1.5), between it and DoWG (docs/tuner.md §14)
    "scale_free_dowg_neutral_lr_1.22_clip": lambda params: HeavyBall(params, tuner="scale_free",
                                                                     step_rule="dowg_neutral", lr=math.sqrt(1.5),
                                                                     initial_distance=1e-3),
    "scale_free_adam_dowg_neutral_start_1e-2": lambda params: YellowFin(params, precondition="adam",
                                                                        step_rule="dowg_neutral",
                                                                        initial_distance=1e-2,
                                                                        momentum_form="heavy_ball"),
    # the default's pair in primal-averaging form (momentum_form, docs/tuner.md §18)
    "scale_free_dowg_clip_hold_primal_average": lambda params: YellowFin(params, tuner="scale_free", step_rule="dowg",
                                                                         initial_distance=1e-3,
                                                                         hold_distance_uphill=True,
                                                                         momentum_form="primal_average"),
    # both with the clip acting on every gradient above its level (clip_trigger=2, docs/tuner.md §19)
    "scale_free_dowg_clip_trigger_2_hold": lambda params: HeavyBall(params, tuner="scale_free", step_rule="dowg",
                                                                    initial_distance=1e-3, hold_distance_uphill=True,
                                                                    clip_trigger=2.0),
    "scale_free_dowg_clip_trigger_2_hold_primal_average": lambda params: YellowFin(
        params, tuner="scale_free", step_rule="dowg", initial_distance=1e-3, hold_distance_uphill=True,
        clip_trigger=2.0, momentum_form="primal_average"),
    "reference": lambda params: YellowFin.reference_variant(params),
    "sgd_momentum_lr0.1": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}


def build(name: str):
    if name.startswith("screen:"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tuner_screen import builder  # (benchmarks/ is not a package)

        return builder(name.removeprefix("screen:"))
    if name not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {name!r}: {', '.join(OPTIMIZERS)} or screen:VARIANT")
    return OPTIMIZERS[name]


def run(name: str, seed: int, steps: int, examples: int = 256, batch: int = 32, trace: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, 20, generator=generator)
    labels = (inputs @ torch.randn(20, 4, generator=generator)).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    optimizer = build(name)(model.parameters())
    worst, blew_up_at = 0.0, None
    for step in range(steps):
        index = torch.randint(0, examples, (batch,), generator=generator)
        loss = F.cross_entropy(model(inputs[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if trace and step % 50 == 0:  # (what the tuner does as a run goes wrong: docs/tuner.md §14.1)
            stats = optimizer.stats() if hasattr(optimizer, "stats") else {}
            effective = stats["alpha"] / (1.0 - stats["mu"]) if stats else math.nan
            grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
            weights_norm = torch.cat([p.detach().flatten() for p in model.parameters()]).norm()
            print(f"step {step}: batch loss {value:.3g}, ||g|| {float(grad_norm):.3g}, effective step "
                  f"{effective:.3g}, ||x|| {float(weights_norm):.3g}", flush=True)
        if step >= 200:
            worst = max(worst, value) if math.isfinite(value) else math.inf
        if blew_up_at is None and not value < 10.0:
            blew_up_at = step
        if not math.isfinite(value):
            break
    with torch.no_grad():
        final = float(F.cross_entropy(model(inputs), labels))
    return {"optimizer": name, "seed": seed, "final_loss": finite_or_none(final),
            "worst_batch_loss_after_200": finite_or_none(worst), "first_loss_above_10": blew_up_at}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--trace", action="store_true",
                        help="print the batch loss, gradient norm, effective step and weights' norm every 50 steps "
                             "(a diagnostic: no results file is written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.optimizers:
        build(name)  # (an unknown name fails before any run)
    for name in args.optimizers:
        results = []
        for seed in args.seeds:
            record = run(name, seed, args.steps, trace=args.trace)
            results.append(record)
            print(f"{name} seed {seed}: final loss {record['final_loss']}, worst batch loss after 200 steps "
                  f"{record['worst_batch_loss_after_200']}, first batch loss above 10 at step "
                  f"{record['first_loss_above_10']}", flush=True)
        if args.trace:
            continue
        path = OUT / f"{name.replace(':', '_')}.json"
        path.write_text(json.dumps({"steps": args.steps, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
