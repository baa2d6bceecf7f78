"""Does an optimizer's training depend on the scale of the loss? (issue 12, item 2: "measure it")

A 20-64-1 tanh MLP fits a synthetic regression (a fixed random teacher plus noise) for 300 steps of batch 32,
with the mini-batch loss multiplied by c in {1e-4, 1e-2, 1, 1e2, 1e4}. A tuning-free optimizer should end at the
same point for every c. Reported: the final full-batch mean squared error of the unscaled loss on the training
set, per optimizer and c (mean ± std over seeds), and at c = 1 the effect of the batch size (8, 32, 128).

    python benchmarks/loss_scale.py                       # YellowFin (both metrics' defaults) and Adam lr 1e-2
    python benchmarks/loss_scale.py --variants paper      # add registered YellowFin variants (bench/variants.py)

Writes benchmarks/results-loss-scale/loss_scale.json and loss_scale.md. A few seconds of CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from yellowfin import YellowFin
from yellowfin.bench.variants import get_variant

Builder = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

SCALES = (1e-4, 1e-2, 1.0, 1e2, 1e4)
BATCH_SIZES = (8, 32, 128)
STEPS = 300
BATCH = 32
INPUTS, HIDDEN = 20, 64
EXAMPLES = 2048
NOISE = 0.3  # the targets' noise: the best reachable MSE is about NOISE ** 2 = 0.09
OUT_DIR = Path(__file__).resolve().parent / "results-loss-scale"

BUILDERS: dict[str, Builder] = {
    "yellowfin": lambda params: YellowFin(params),  # its defaults, as a new user would
    "yellowfin_reference": lambda params: YellowFin.reference_variant(params),  # the authors' algorithm
    "yellowfin_adam": lambda params: YellowFin(params, precondition="adam"),  # the preconditioned mode's defaults
    "adam_lr1e-2": lambda params: torch.optim.Adam(params, lr=1e-2),
}


def regression_data(seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I_20); y = a random 20-8-1 tanh teacher's output + N(0, NOISE^2). Fixed for every run."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(EXAMPLES, INPUTS, generator=generator)
    first = torch.randn(INPUTS, 8, generator=generator) / math.sqrt(INPUTS)
    second = torch.randn(8, 1, generator=generator)
    y = torch.tanh(x @ first) @ second + NOISE * torch.randn(EXAMPLES, 1, generator=generator)
    return x, y


def train(build: Builder, scale: float, batch_size: int, seed: int, data: tuple[torch.Tensor, torch.Tensor],
          steps: int = STEPS) -> float:
    """Final full-batch MSE (unscaled) after `steps` steps on the loss scale * MSE(mini-batch); inf if diverged."""
    x, y = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    optimizer = build(model.parameters())
    generator = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = scale * nn.functional.mse_loss(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    return final if math.isfinite(final) else math.inf


def measure(builders: dict[str, Builder], seeds: Sequence[int], scales: Sequence[float] = SCALES,
            batch_sizes: Sequence[int] = BATCH_SIZES, steps: int = STEPS) -> dict:
    """{"scale": {optimizer: {c: [final MSE per seed]}}, "batch": {optimizer: {batch size: [...]}}}."""
    data = regression_data()
    results: dict = {"scale": {}, "batch": {}}
    for name, build in builders.items():
        results["scale"][name] = {repr(c): [train(build, c, BATCH, s, data, steps) for s in seeds] for c in scales}
        results["batch"][name] = {str(b): [train(build, 1.0, b, s, data, steps) for s in seeds] for b in batch_sizes}
    return results


def _cell(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    text = f"{statistics.fmean(finite):.3g} ± {statistics.stdev(finite):.2g}" if len(finite) > 1 else f"{finite[0]:.3g}"
    return text + (f" ({len(values) - len(finite)} diverged)" if len(finite) < len(values) else "")


def markdown(results: dict, seeds: Sequence[int]) -> str:
    lines = [f"Final full-batch MSE of the unscaled loss (mean ± std over seeds {', '.join(map(str, seeds))}); "
             f"20-{HIDDEN}-1 tanh MLP, {STEPS} steps; noise floor about {NOISE ** 2:.2g}.", "",
             f"Loss multiplied by c, batch {BATCH}:", ""]
    scales = next(iter(results["scale"].values()))
    lines += ["| optimizer | " + " | ".join(f"c = {float(c):g}" for c in scales) + " |",
              "|---|" + "---|" * len(scales)]
    for name, row in results["scale"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(v) for v in row.values()) + " |")
    sizes = next(iter(results["batch"].values()))
    lines += ["", "Batch size, c = 1:", "", "| optimizer | " + " | ".join(f"batch {b}" for b in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for name, row in results["batch"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(v) for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def _finite_or_null(value):
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=[], metavar="NAME",
                        help="registered YellowFin variants to measure too (see `yellowfin ablate --list`)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="directory for loss_scale.json and .md")
    args = parser.parse_args(argv)
    builders = dict(BUILDERS)
    for name in args.variants:
        try:
            variant = get_variant(name)
        except KeyError as exc:
            parser.error(str(exc.args[0]))
        if variant.control_of is not None:
            parser.error(f"variant {name!r} is a control (it replays a trace): nothing to measure here")
        builders[f"yellowfin {name}"] = variant.build
    started = time.process_time()
    results = measure(builders, args.seeds)
    text = markdown(results, args.seeds)
    record = {
        "command": " ".join(["python benchmarks/loss_scale.py", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "setup": {"inputs": INPUTS, "hidden": HIDDEN, "examples": EXAMPLES, "noise": NOISE, "steps": STEPS,
                  "batch": BATCH, "scales": list(SCALES), "batch_sizes": list(BATCH_SIZES), "seeds": args.seeds},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "cpu_seconds": time.process_time() - started,
        "final_full_batch_mse": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # JSON has no infinity: a diverged run's MSE is stored as null.
    (args.out / "loss_scale.json").write_text(json.dumps(_finite_or_null(record), indent=1, allow_nan=False) + "\n")
    (args.out / "loss_scale.md").write_text(text)
    print(text)
    print(f"{record['cpu_seconds']:.1f} CPU seconds; wrote {args.out / 'loss_scale.json'} and loss_scale.md")


if __name__ == "__main__":
    main()
