"""How DoG about the iterates' average anneals near a minimum (docs/tuner.md §13).

On the noisy quadratic h/2 ||x||^2 + <xi_t, x> (1000 coordinates, xi_t ~ N(0, I) fresh each step, x_0 = 1,
float64, no momentum), the prototype's rule about the uniform average (``snr_anchor_uniform``) should settle on an
effective step c / (h t), the 1/t schedule (its O(1/t) rate needs c > 1/2); DoG's rule about x_0
(``snr_dog_start_1e-3``) anneals as 1 / sqrt(t) there, so its c = eta t h keeps growing. Prints and writes c at
several steps for each rule and curvature.

    python benchmarks/anchor_annealing.py      # writes benchmarks/results-anchor-annealing/annealing.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tuner_screen import VARIANTS, FlatTuner  # noqa: E402

OUT = Path(__file__).resolve().parent / "results-anchor-annealing" / "annealing.json"
AT = (100, 300, 1000, 3000, 10000, 30000)


def effective_steps(make_tuner: Callable, curvature: float, at: tuple[int, ...], seed: int = 0) -> list[float]:
    """A prototype tuner's effective steps at the steps ``at`` on curvature/2 ||x||^2 + <xi_t, x> (curvature 0:
    gradients of pure noise, a random walk), float64, 1000 coordinates, from x_0 = 1."""
    x = torch.ones(1000, dtype=torch.float64, requires_grad=True)
    opt = make_tuner([x])
    generator = torch.Generator().manual_seed(seed)
    effective = {}
    for step in range(1, max(at) + 1):
        x.grad = curvature * x.detach() + torch.randn(1000, dtype=torch.float64, generator=generator)
        opt.step()
        if step in at:
            effective[step] = opt.trace["effective_lr"][-1]
    return [effective[step] for step in at]


def eta_t_h(variant: str, curvature: float) -> dict[int, float]:
    """c = eta t h at the steps AT for a FlatTuner variant without momentum."""
    steps = effective_steps(lambda params: FlatTuner(params, **VARIANTS[variant], without_momentum=True), curvature, AT)
    return {t: eta * t * curvature for t, eta in zip(AT, steps)}


def main() -> int:
    torch.set_num_threads(1)
    results = []
    for variant in ("snr_anchor_uniform", "snr_dog_start_1e-3"):
        for curvature in (0.1, 1.0):
            c = eta_t_h(variant, curvature)
            results.append({"variant": variant, "curvature": curvature, "eta_t_h": {str(k): v for k, v in c.items()}})
            print(f"{variant:20s} h={curvature:<4g} " + "  ".join(f"t={k}: {v:.3g}" for k, v in c.items()),
                  flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python benchmarks/anchor_annealing.py", "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
