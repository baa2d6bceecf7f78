"""The optimizers the benchmarks compare, by name, with how each one is configured.

Three kinds:
- "untuned": run at fixed, documented defaults on every task (YellowFin and the tuning-free peers);
- "tuned": the learning rate is picked per task from the task's log-scale grid on the validation split;
- "control": plain SGD (no momentum) whose step size at step t is YellowFin's effective step alpha_t / (1 - mu_t),
  read from the trace of the YellowFin run with the same task, seed and budget (the critique's control).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

UNTUNED, TUNED, CONTROL = "untuned", "tuned", "control"


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    label: str  # for tables and legends
    kind: str  # UNTUNED, TUNED or CONTROL
    build: Callable[..., torch.optim.Optimizer]  # build(params, lr) ; lr is None unless kind == TUNED
    requires: str | None = None  # importable module of an optional dependency
    pip_name: str | None = None
    hyper: dict[str, Any] = field(default_factory=dict)  # fixed hyperparameters, recorded in results

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def missing_message(self) -> str:
        return f"{self.name} needs the optional package {self.pip_name or self.requires}: pip install {self.pip_name}"


def _yellowfin(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    from yellowfin import YellowFin

    return YellowFin(params)  # defaults, never tuned: that is the point of the library


def _sgd_momentum(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _adam(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def _plain_sgd(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    # The step size is overwritten before every step from YellowFin's trace (see runner.py).
    return torch.optim.SGD(params, lr=lr if lr is not None else 0.0, momentum=0.0)


def _from_module(module: str, cls: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
        return getattr(importlib.import_module(module), cls)(params)  # the package's documented defaults

    return build


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("yellowfin", "YellowFin (defaults)", UNTUNED, _yellowfin),
        OptimizerSpec("sgd_momentum", "Momentum SGD (0.9, tuned lr)", TUNED, _sgd_momentum, hyper={"momentum": 0.9}),
        OptimizerSpec("adam", "Adam (tuned lr)", TUNED, _adam, hyper={"betas": [0.9, 0.999]}),
        OptimizerSpec("schedulefree_sgd", "Schedule-Free SGD", UNTUNED,
                      _from_module("schedulefree", "SGDScheduleFree"), "schedulefree", "schedulefree"),
        OptimizerSpec("schedulefree_adamw", "Schedule-Free AdamW", UNTUNED,
                      _from_module("schedulefree", "AdamWScheduleFree"), "schedulefree", "schedulefree"),
        OptimizerSpec("prodigy", "Prodigy", UNTUNED, _from_module("prodigyopt", "Prodigy"), "prodigyopt", "prodigyopt"),
        OptimizerSpec("dadapt_adam", "D-Adaptation Adam", UNTUNED, _from_module("dadaptation", "DAdaptAdam"),
                      "dadaptation", "dadaptation"),
        OptimizerSpec("sgd_yf_step", "SGD with YF's step a/(1-mu)", CONTROL, _plain_sgd, hyper={"momentum": 0.0}),
    )
}
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)


def get_optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None


def resolve_optimizers(names: Sequence[str]) -> list[OptimizerSpec]:
    """Specs for the given names, in the order the suite must run them (YellowFin before its control)."""
    specs = [get_optimizer_spec(n) for n in dict.fromkeys(names)]
    return sorted(specs, key=lambda s: s.kind == CONTROL)


def set_train_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Schedule-Free keeps two points and must be told which one the model should hold."""
    method = getattr(optimizer, "train" if training else "eval", None)
    if callable(method):
        method()


def needs_mode_switch(optimizer: torch.optim.Optimizer) -> bool:
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
