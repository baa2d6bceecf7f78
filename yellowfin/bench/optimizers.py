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

from ..state import DEFAULT_TUNER

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
    # Schedule-Free keeps two points: the optimizer must be told (train()/eval()) which one the model holds, and
    # the evaluated point's batch-norm statistics must be refreshed before evaluation.
    needs_mode_switch: bool = False
    # The optimizer tunes itself and reports what it chose through stats() (YellowFin and its variants): the
    # runner records the trace, which the control replays and the report plots.
    records_tuner_trace: bool = False
    # Runs on every seed of a suite although untuned: the method under study (the peers run on the first seed).
    every_seed: bool = False
    # The report's method under study: drawn highlighted, and the "speedup over X" columns are its speedups.
    highlight: bool = False
    # CONTROL only: the name of the spec whose effective_lr trace this run replays.
    replays: str | None = None
    # Iterate averaging that belongs to the optimizer's recommended usage (DoG, YellowFin's average where kept):
    # averager(model, optimizer) returns an object with step() (called after every optimizer step) and
    # averaged_model (what is evaluated).
    averager: Callable[[torch.nn.Module, torch.optim.Optimizer], Any] | None = None

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def missing_message(self) -> str:
        return f"{self.name} needs the optional package {self.pip_name or self.requires}: pip install {self.pip_name}"


def _yellowfin(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    from yellowfin import YellowFin

    return YellowFin(params)  # defaults, never tuned: that is the point of the library


def _yellowfin_reference(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    from yellowfin import YellowFin

    return YellowFin.reference_variant(params)  # the authors' algorithm, kept in every table beside the default


def _sgd_momentum(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _adam(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


def plain_sgd(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
    # The step size is overwritten before every step from YellowFin's trace (see runner.py).
    return torch.optim.SGD(params, lr=lr if lr is not None else 0.0, momentum=0.0)


def _from_module(module: str, cls: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Iterable, lr: float | None = None) -> torch.optim.Optimizer:
        return getattr(importlib.import_module(module), cls)(params)  # the package's documented defaults

    return build


def _dog_averager(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    # The dog package's README: "DoG/L-DoG must be combined with iterate averaging", with its
    # PolynomialDecayAverager at its default configuration; the evaluation uses the averaged model.
    return importlib.import_module("dog").PolynomialDecayAverager(model)


class YellowFinAverage:
    """The average that YellowFin keeps (average=True, or in primal-average form), as a model to evaluate: a copy of
    the model whose parameters are copied from ``optimizer.averaged()`` after every step (its buffers, such as
    batch-norm statistics, from the model's current ones; the runner refreshes the latter before the final
    evaluation, as docs/algorithm.md §10 tells users to)."""

    refreshes_batchnorm = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import copy

        self.model, self.optimizer = model, optimizer
        self.averaged_model = copy.deepcopy(model)

    @torch.no_grad()
    def step(self) -> None:
        with self.optimizer.averaged():
            for averaged, current in zip(self.averaged_model.parameters(), self.model.parameters()):
                averaged.copy_(current)
        for averaged, current in zip(self.averaged_model.buffers(), self.model.buffers()):
            averaged.copy_(current)


def yellowfin_average_if_kept(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> YellowFinAverage | None:
    """The average YellowFin keeps (average=True, or the primal-average form, the default), else None: the point it
    hands out is the one evaluated."""
    return YellowFinAverage(model, optimizer) if optimizer.keeps_average() else None


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        # (results files written before the default became the scale-free tuner hold the reference's runs under
        # "yellowfin" and its control's under "sgd_yf_step"; they were renamed to the two reference names below)
        OptimizerSpec("yellowfin", "YellowFin (defaults)", UNTUNED, _yellowfin, hyper={"tuner": DEFAULT_TUNER},
                      records_tuner_trace=True, every_seed=True, highlight=True, averager=yellowfin_average_if_kept),
        OptimizerSpec("yellowfin_reference", "YellowFin (the authors' reference)", UNTUNED, _yellowfin_reference,
                      hyper={"tuner": "reference"}, records_tuner_trace=True, every_seed=True),
        OptimizerSpec("sgd_momentum", "Momentum SGD (0.9, tuned lr)", TUNED, _sgd_momentum, hyper={"momentum": 0.9}),
        OptimizerSpec("adam", "Adam (tuned lr)", TUNED, _adam, hyper={"betas": [0.9, 0.999]}),
        OptimizerSpec("schedulefree_sgd", "Schedule-Free SGD", UNTUNED,
                      _from_module("schedulefree", "SGDScheduleFree"), "schedulefree", "schedulefree",
                      needs_mode_switch=True),
        OptimizerSpec("schedulefree_adamw", "Schedule-Free AdamW", UNTUNED,
                      _from_module("schedulefree", "AdamWScheduleFree"), "schedulefree", "schedulefree",
                      needs_mode_switch=True),
        OptimizerSpec("prodigy", "Prodigy", UNTUNED, _from_module("prodigyopt", "Prodigy"), "prodigyopt", "prodigyopt"),
        OptimizerSpec("dadapt_adam", "D-Adaptation Adam", UNTUNED, _from_module("dadaptation", "DAdaptAdam"),
                      "dadaptation", "dadaptation"),
        # DoG at the package's defaults (reps_rel 1e-6 on every task, although its docstring suggests 1e-4 for
        # models with batch norm: one set of defaults everywhere, like every other untuned peer), evaluated at
        # the polynomial-decay average its README says it must be used with.
        OptimizerSpec("dog", "DoG (+ poly. averaging)", UNTUNED, _from_module("dog", "DoG"), "dog", "dog-optimizer",
                      hyper={"averaging": "PolynomialDecayAverager(gamma=8)"}, averager=_dog_averager),
        OptimizerSpec("sgd_yf_step", "SGD with YF's step a/(1-mu)", CONTROL, plain_sgd, hyper={"momentum": 0.0},
                      replays="yellowfin"),
        OptimizerSpec("sgd_yf_reference_step", "SGD with the reference's step a/(1-mu)", CONTROL, plain_sgd,
                      hyper={"momentum": 0.0}, replays="yellowfin_reference"),
    )
}
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)


def find_optimizer_spec(name: str) -> OptimizerSpec | None:
    """The spec of a suite optimizer or of an ablation variant (yellowfin/bench/variants.py), None if unknown."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    from yellowfin.bench.variants import VARIANT_SPECS  # variants build on this module: imported when needed

    return VARIANT_SPECS.get(name)


def get_optimizer_spec(name: str) -> OptimizerSpec:
    spec = find_optimizer_spec(name)
    if spec is None:
        raise KeyError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return spec


def resolve_optimizers(names: Sequence[str]) -> list[OptimizerSpec]:
    """Specs for the given names, in the order the suite must run them (what a control replays before it)."""
    specs = [get_optimizer_spec(n) for n in dict.fromkeys(names)]
    return sorted(specs, key=lambda s: s.kind == CONTROL)


def set_train_mode(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Tell an optimizer that keeps two points (spec.needs_mode_switch) which one the model should hold."""
    if spec.needs_mode_switch:
        getattr(optimizer, "train" if training else "eval")()
