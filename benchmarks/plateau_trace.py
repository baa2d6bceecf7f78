"""The autoencoder's initial plateau, layer by layer (docs/tuner.md §10).

Trains the suite's deep autoencoder with tuned momentum SGD (lr 1, momentum 0.9, the suite's grid choice) and with
the scale-free tuner's rules, and records at a few steps the batch loss, the momentum, the effective step
alpha / (1 - mu), and each linear layer's weight norm and weight-gradient norm: where the encoder's gradients
vanish (the plateau), and what a large step does when they come back.

    python benchmarks/plateau_trace.py                       # sgd_momentum and dowg, seeds 0 1 2
    python benchmarks/plateau_trace.py --optimizers dog --seeds 0
    python benchmarks/plateau_trace.py --optimizers heavy_ball --seeds 17  # the default before §20, staying (§19)

Writes benchmarks/results-plateau/<optimizer>_seed<k>.json and prints one line per recorded step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from yellowfin import YellowFin
from yellowfin.bench.tasks import get_task

OUT = Path(__file__).resolve().parent / "results-plateau"
RECORDED = (0, 5, 10, 20, 40, 80, 160, 400, 1000, 1999)
STEPS = 2000
TUNED_SGD = dict(lr=1.0, momentum=0.9)  # the suite's grid choice on the autoencoder (benchmarks/results)


def build(name: str, params):
    if name == "sgd_momentum":
        return torch.optim.SGD(params, **TUNED_SGD)
    if name == "default":
        return YellowFin(params)  # (the library's default as it is now; docs/tuner.md §20)
    if name == "heavy_ball":
        return YellowFin(params, momentum_form="heavy_ball")  # (the default before §20, traced in §19)
    return YellowFin(params, tuner="scale_free", step_rule=name, hold_distance_uphill=False)  # (as measured)


def trace(name: str, seed: int) -> dict:
    task = get_task("autoencoder")
    model = task.make_model(seed)
    optimizer = build(name, model.parameters())
    layers = [module for module in model if isinstance(module, torch.nn.Linear)]
    batches, losses, records = task.train_batches(seed), [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = task.loss(model, next(batches))
        loss.backward()
        if step in RECORDED:
            if isinstance(optimizer, YellowFin):
                stats = optimizer.stats()
                mu, effective = float(stats["mu"]), float(stats["alpha"]) / (1.0 - float(stats["mu"]))
            else:
                mu, effective = TUNED_SGD["momentum"], TUNED_SGD["lr"] / (1.0 - TUNED_SGD["momentum"])
            records.append({"step": step, "loss": float(loss.detach()), "mu": mu, "effective_step": effective,
                            "weight_norm": [float(layer.weight.detach().norm()) for layer in layers],
                            "weight_grad_norm": [float(layer.weight.grad.norm()) for layer in layers]})
            print(f"{name} seed {seed} step {step:4d}: loss {records[-1]['loss']:.3f}  mu {mu:.2f}  "
                  f"step {effective:8.3g}  |W| " + " ".join(f"{v:.1f}" for v in records[-1]["weight_norm"])
                  + "  |grad W| " + " ".join(f"{v:.0e}" for v in records[-1]["weight_grad_norm"]), flush=True)
        optimizer.step()
        losses.append(float(loss.detach()))
    final = sum(losses[-100:]) / 100
    print(f"{name} seed {seed}: mean loss of the last 100 steps {final:.4f}", flush=True)
    return {"optimizer": name, "seed": seed, "records": records, "final_loss": final}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=["sgd_momentum", "dowg"],
                        choices=["sgd_momentum", "dowg", "dog", "default", "heavy_ball"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    for name in args.optimizers:
        for seed in args.seeds:
            (OUT / f"{name}_seed{seed}.json").write_text(json.dumps(trace(name, seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
