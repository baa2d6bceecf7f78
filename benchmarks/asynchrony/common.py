"""Shared helpers for the asynchrony experiments: one simulated run, smoothing, iterations to a target."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from yellowfin import YellowFin
from yellowfin.asynchrony import MomentumSensor, StalenessSimulator
from yellowfin.bench import metrics
from yellowfin.bench.tasks import get_task

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURES = os.path.abspath(os.path.join(HERE, "..", "..", "docs", "figures", "asynchrony"))


class HeavyBall(torch.optim.Optimizer):
    """Momentum SGD that also accepts negative momentum (torch.optim.SGD refuses it):
    v <- mu v + g; x <- x - lr v (the same lr-outside form as torch SGD and YellowFin)."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buffer.mul_(group["momentum"]).add_(p.grad)
                p.add_(buffer, alpha=-group["lr"])


# The scale-free tuner's methods (closed-loop: it runs under asynchrony only so, its step cut for the staleness).
SCALE_FREE_METHODS = {  # (their defaults; under asynchrony the relative clip acts at its own level)
    "scale_free_closed": dict(tuner="scale_free", hold_distance_uphill=False),  # (as measured, before the hold)
    "scale_free_adam_closed": dict(tuner="scale_free", precondition="adam", step_rule="dog"),  # (as first measured)
    # (the neutral rule as measured, from the first move 1e-3; its default start since is 1e-2, docs/tuner.md §14)
    "scale_free_adam_neutral_closed": dict(tuner="scale_free", precondition="adam", step_rule="dowg_neutral",
                                           initial_distance=1e-3),
    "scale_free_adam_default_closed": dict(tuner="scale_free", precondition="adam"),  # (Adam's metric's defaults)
    "scale_free_default_closed": dict(tuner="scale_free"),  # (the plain defaults since DoWG's distance hold, §16)
}
# Screens (docs/tuner.md §15.1), run by --only alone: each metric's defaults with the staleness the system reports
# never below the delay the schedule is expected to bring (M - 1), so that the step's cut acts from the first update.
SCREEN_METHODS = {"scale_free_closed_expected": dict(tuner="scale_free", hold_distance_uphill=False),
                  "scale_free_adam_default_closed_expected": dict(tuner="scale_free", precondition="adam")}


def report_at_least_the_expected_delay(optimizer, expected: float) -> None:
    """The screens' staleness report (docs/tuner.md §15.1): what the system reports, but never below ``expected``,
    from before the first update on, so that the step's cut acts from the first update."""
    reported = optimizer.set_staleness
    optimizer.set_staleness = lambda mean, scope=None: reported(max(mean, expected), scope)
    optimizer.set_staleness(0.0)


def is_closed_loop(method: str) -> bool:
    return method.startswith("yellowfin_closed") or method in SCALE_FREE_METHODS or method in SCREEN_METHODS


def make_optimizer(method: str, params, lr: float | None = None, momentum: float = 0.0):
    if method.startswith("yellowfin"):  # the authors' reference, as these experiments were first run
        return YellowFin.reference_variant(params)
    if method in SCALE_FREE_METHODS or method in SCREEN_METHODS:
        return YellowFin(params, **{**SCALE_FREE_METHODS, **SCREEN_METHODS}[method])
    if method == "adam":
        return torch.optim.Adam(params, lr=lr)
    if method == "sgd":
        return HeavyBall(params, lr=lr, momentum=momentum)
    raise ValueError(method)


def simulate(task, method: str, num_workers: int, steps: int, seed: int = 0, lr: float | None = None,
             momentum: float = 0.0, staleness: str = "geometric", sensors: bool = True,
             eval_fn=None, eval_every: int = 0, gain: float = 0.01, trace_every: int = 10,
             divergence: float = 1e6) -> dict:
    """One run under simulated asynchrony. Returns losses, staleness, sensor and tuner traces."""
    torch.manual_seed(seed)
    model = task.make_model(seed)
    optimizer = make_optimizer(method, model.parameters(), lr, momentum)
    if method in SCREEN_METHODS:
        report_at_least_the_expected_delay(optimizer, num_workers - 1.0)
    numel = sum(p.numel() for p in model.parameters())
    sensor_list = []
    if sensors:
        sensor_list = [MomentumSensor(numel, 512, seed=seed, step_scale=1.0),
                       MomentumSensor(numel, 512, seed=seed, step_scale=1.0 / num_workers)]
    sim = StalenessSimulator(model, optimizer, num_workers, staleness, seed=seed, sensors=sensor_list,
                             closed_loop=is_closed_loop(method), gain=gain, trace_every=trace_every,
                             sensor_step="effective" if method.endswith("effective") else "algorithmic")
    batches = task.train_batches(seed)
    losses, evals = [], []
    started = time.time()
    for step in range(steps):
        loss = sim.step(task.loss, next(batches))
        losses.append(loss)
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
            evals.append((step + 1, eval_fn(model)))
        if not math.isfinite(loss) or loss > divergence:
            break
    return {"method": method, "num_workers": num_workers, "lr": lr, "momentum": momentum, "seed": seed,
            "losses": losses, "evals": evals, "trace": sim.trace, "seconds": time.time() - started,
            "staleness_counts": dict(sim.staleness_counts), "diverged": len(losses) < steps,
            # Trace keys: with a closed loop, mu_hat_0 is the controller's sensor and mu_hat_1 / mu_hat_2 the
            # algorithmic / effective diagnostics; otherwise mu_hat_0 / mu_hat_1 are those two.
            "sensor_keys": ({"controller": "mu_hat_0", "algorithmic": "mu_hat_1", "effective": "mu_hat_2"}
                            if is_closed_loop(method) else
                            {"algorithmic": "mu_hat_0", "effective": "mu_hat_1"})}


def smooth(values, beta: float = 0.95) -> list[float]:
    """The curves these experiments store: a bias-corrected exponential moving average (JSON-ready list)."""
    return metrics.exponential_smooth(values, beta).tolist()


def iterations_to(values, target: float, stride: int = 1):
    """First iteration (1-based, in units of ``stride``) where ``values`` reach ``target``; None if never."""
    reached = metrics.steps_to_reach(np.asarray(values, dtype=np.float64), target)
    return None if reached is None else reached * stride


def save_json(obj, name: str) -> str:
    path = os.path.join(HERE, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    return path
