"""Does decoupled weight decay depend on the loss scale? (docs/tuner.md §23.2)

A 20-64-1 tanh MLP is trained with Adam to near its noise floor on benchmarks/loss_scale.py's regression, then
fine-tuned for 200 steps of batch 32 with decoupled weight decay 0.01 and the loss multiplied by c in {1, 1e-3}:
YellowFin in each metric and form, and AdamW (lr 1e-3) for comparison. A decay that has AdamW's meaning leaves the
weights where they are at either c. Printed and written to benchmarks/results-decay-fine-tune/: the full-batch MSE
and the weights' norm after 1, 10 and 200 steps.

    python benchmarks/decay_fine_tune.py

(Run from a checkout of 711a000 to see the old unit, lr alpha lambda: at c = 1e-3 the first step halved the norm.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_scale  # noqa: E402  (the regression data)

from yellowfin import YellowFin  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "results-decay-fine-tune"
DECAY = 1e-2
CHECKPOINTS = (1, 10, 200)
OPTIMIZERS = {
    "yellowfin": lambda p: YellowFin(p, weight_decay=DECAY, decoupled_weight_decay=True),
    "yellowfin heavy ball": lambda p: YellowFin(p, weight_decay=DECAY, decoupled_weight_decay=True,
                                               momentum_form="heavy_ball"),
    "yellowfin precondition=adam": lambda p: YellowFin(p, weight_decay=DECAY, decoupled_weight_decay=True,
                                                      precondition="adam"),
    "adamw lr 1e-3": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=DECAY),
}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = loss_scale.regression_data()
    model = nn.Sequential(nn.Linear(loss_scale.INPUTS, loss_scale.HIDDEN), nn.Tanh(), nn.Linear(loss_scale.HIDDEN, 1))
    pretrain = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3000):
        rows = torch.randint(0, len(x), (512,))
        pretrain.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        pretrain.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    def measure() -> dict:
        with torch.no_grad():
            return {"mse": nn.functional.mse_loss(model(x), y).item(),
                    "norm": torch.cat([p.reshape(-1) for p in model.parameters()]).norm().item()}

    results = {"trained": measure(), "runs": {}}
    lines = [f"trained: MSE {results['trained']['mse']:.4f}, norm {results['trained']['norm']:.3f}", "",
             "| optimizer | c | " + " | ".join(f"MSE, norm after {n}" for n in CHECKPOINTS) + " |",
             "|---|---|" + "---|" * len(CHECKPOINTS)]
    for name, build in OPTIMIZERS.items():
        for scale in (1.0, 1e-3):
            model.load_state_dict(trained)
            optimizer = build(model.parameters())
            generator = torch.Generator().manual_seed(1)
            points = []
            for step in range(1, max(CHECKPOINTS) + 1):
                rows = torch.randint(0, len(x), (32,), generator=generator)
                optimizer.zero_grad()
                (scale * nn.functional.mse_loss(model(x[rows]), y[rows])).backward()
                optimizer.step()
                if step in CHECKPOINTS:
                    points.append({"step": step, **measure()})
            results["runs"][f"{name}, c={scale:g}"] = points
            lines.append(f"| {name} | {scale:g} | "
                         + " | ".join(f"{p['mse']:.4f}, {p['norm']:.3f}" for p in points) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/decay_fine_tune.py", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
              time.gmtime()), "torch": torch.__version__, "decay": DECAY, "results": results}
    (OUT_DIR / "decay_fine_tune.json").write_text(json.dumps(record, indent=1) + "\n")
    (OUT_DIR / "decay_fine_tune.md").write_text(text)


if __name__ == "__main__":
    main()
