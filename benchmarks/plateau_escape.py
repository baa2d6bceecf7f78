"""How soon each optimizer leaves the deep autoencoder's initial plateau, over many seeds (docs/tuner.md §19).

The suite's autoencoder starts on a plateau (batch loss about 0.49, the decoder putting out the mean image) that a
run must leave by a saddle's escape. One seed of five of the primal-average form never left it in 2000 steps; three
seeds cannot say how often that happens, nor how much later the form leaves it than heavy ball. This script trains
each optimizer from many seeds for a short budget and records the step at which the running mean of the batch loss
over 50 steps first falls below 0.45 (the escape), or none.

    python benchmarks/plateau_escape.py          # every optimizer of BUILDERS, seeds 0-19
    python benchmarks/plateau_escape.py --optimizers primal_average --seeds 0 1 2 --steps 600
    python benchmarks/plateau_escape.py --optimizers screen:primal_averaging_poly    # a prototype
    python benchmarks/plateau_escape.py --optimizers variant:scale_free_dowg_clip_average   # an ablation variant

Writes benchmarks/results-plateau-escape/<optimizer>_seed<k>_steps<n>.json (the batch losses; runs already there are
read, not rerun) and prints, per optimizer, the escape steps, their median (a run that did not escape counts as
later than any that did) and how many seeds did not escape.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from yellowfin import YellowFin
from yellowfin.bench.data import DataNotFoundError
from yellowfin.bench.errors import BadInputError
from yellowfin.bench.tasks import get_task
from yellowfin.bench.variants import VARIANTS
from yellowfin.state import outlier_trigger

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # (the sibling scripts, also when this one is loaded by path, as the tests do)
    sys.path.insert(0, str(HERE))
from plateau_trace import TUNED_SGD  # noqa: E402 (the suite's grid choice on the autoencoder)

OUT = HERE / "results-plateau-escape"
ESCAPED_BELOW = 0.45  # the plateau sits at about 0.49; every run that leaves it passes 0.45 on its way to 0.32
WINDOW = 50
BUILDERS = {
    "default": lambda params: YellowFin(params),  # (the library's default as it is now: docs/tuner.md §20)
    # the default before §20 (heavy ball, the clip's trigger at 10 times the running RMS), and its pair in
    # primal-average form with that trigger, as §19 measured them
    "heavy_ball": lambda params: YellowFin(params, momentum_form="heavy_ball"),
    "primal_average": lambda params: YellowFin(params, momentum_form="primal_average",
                                               clip_trigger=outlier_trigger(0.99)),
    # Adam's metric in heavy ball, as first measured (its default form since docs/tuner.md §21 is the next one)
    "adam_metric": lambda params: YellowFin(params, precondition="adam", momentum_form="heavy_ball"),
    "adam_metric_primal_average": lambda params: YellowFin(params, precondition="adam"),
    "sgd_momentum": lambda params: torch.optim.SGD(params, **TUNED_SGD),
}


def known(name: str) -> bool:
    if name.startswith("variant:"):
        return name.removeprefix("variant:") in VARIANTS
    return name in BUILDERS or name.startswith("screen:")


def builder(name: str):
    """The library's optimizers by name, ``variant:NAME``, a variant of ``yellowfin ablate``, or ``screen:VARIANT``,
    a prototype of benchmarks/tuner_screen.py."""
    if name.startswith("variant:"):
        return VARIANTS[name.removeprefix("variant:")].build
    if name.startswith("screen:"):
        import tuner_screen

        return tuner_screen.builder(name.removeprefix("screen:"), "autoencoder")
    return BUILDERS[name]


def escape_step(losses: list[float]) -> int | None:
    """The first step at which the mean of the last ``WINDOW`` batch losses is below ``ESCAPED_BELOW``."""
    total = 0.0
    for step, loss in enumerate(losses):
        total += loss - (losses[step - WINDOW] if step >= WINDOW else 0.0)
        if step >= WINDOW - 1 and total / WINDOW < ESCAPED_BELOW:
            return step
    return None


def median_escape(escapes: list[int | None]) -> float | None:
    """The median escape step, a run that did not escape counting as later than any that did (None if that is the
    median)."""
    ordered = sorted(escapes, key=lambda s: math.inf if s is None else s)
    middle = ordered[(len(ordered) - 1) // 2], ordered[len(ordered) // 2]
    return None if None in middle else (middle[0] + middle[1]) / 2


def run(name: str, seed: int, steps: int, out: Path = OUT, **task_options) -> dict:
    """One run, read from ``out`` if it is there; ``task_options`` go to the task (e.g. ``data_dir``)."""
    path = out / f"{name.replace(':', '_')}_seed{seed}_steps{steps}.json"
    if path.exists():
        return json.loads(path.read_text())
    task = get_task("autoencoder", **task_options)
    model = task.make_model(seed)
    optimizer = builder(name)(model.parameters())
    batches, losses = task.train_batches(seed), []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, next(batches))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):  # (diverged: the escape is then none)
            break
    record = {"optimizer": name, "seed": seed, "steps": steps, "losses": losses, "escape_step": escape_step(losses)}
    out.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(path)  # (a crash leaves no half-written run behind)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(BUILDERS),
                        help=f"{', '.join(BUILDERS)}, variant:NAME (a variant of yellowfin ablate), or screen:VARIANT "
                        "(a prototype of benchmarks/tuner_screen.py)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(20)))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST's IDX files (default: the Debian package's)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.optimizers if not known(name)]
    if unknown:
        parser.error(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(BUILDERS)}, variant:NAME (a variant "
                     "of yellowfin ablate) or screen:VARIANT")
    if args.steps < WINDOW:
        parser.error(f"--steps must be at least {WINDOW}, the escape's window")
    torch.set_num_threads(1)
    escapes = {}
    for name in args.optimizers:
        escapes[name] = []
        for index, seed in enumerate(args.seeds, 1):
            start = time.monotonic()
            try:
                record = run(name, seed, args.steps, **({"data_dir": args.data_dir} if args.data_dir else {}))
            except (DataNotFoundError, BadInputError) as error:  # (one line, not a traceback)
                parser.exit(2, f"plateau_escape.py: {error}\n")
            escapes[name].append(record["escape_step"])
            print(f"[{name} {index}/{len(args.seeds)}] seed {seed}: escape at "
                  f"{record['escape_step'] if record['escape_step'] is not None else 'none'} "
                  f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    print(f"\nEscape from the autoencoder's plateau (running mean of {WINDOW} batch losses below {ESCAPED_BELOW}), "
          f"{args.steps} steps, seeds {args.seeds[0]}..{args.seeds[-1]}:\n")
    print("| optimizer | escape step per seed | median | seeds that did not escape |")
    print("|---|---|---|---|")
    for name, steps in escapes.items():
        median = median_escape(steps)
        cells = ", ".join("none" if s is None else str(s) for s in steps)
        print(f"| {name} | {cells} | {'none' if median is None else f'{median:.0f}'} | "
              f"{steps.count(None)} of {len(steps)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
