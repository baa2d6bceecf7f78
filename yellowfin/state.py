"""What the tuner remembers between steps, how it is configured, and how it is saved.

A tuner owns one ``TunerState`` per tuning scope (all parameter groups together by default,
or one per group). Every field is a float64 tensor on the parameters' device, so a step can
update the whole record without leaving the device, and a checkpoint is a plain dict of
tensors that ``torch.load(..., weights_only=True)`` accepts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class TunerSettings:
    """Settings shared by every parameter that one tuner measures."""

    beta: float = 0.999
    curvature_window: int = 20
    eps: float = 1e-6
    initial_lr: float = 1e-4
    initial_momentum: float = 0.0
    adaptive_clipping: bool = True
    slow_start: bool = True
    clip_norm: float | None = None
    sparsity_correction: bool = False
    # The paper's variant (Algorithm 1) differs from the reference in these three:
    update_first: bool = False
    curvature_smoothing: str = "log"
    smooth_tuned: bool = False

    def __post_init__(self):
        _check(0.0 <= self.beta < 1.0, "beta", self.beta, "[0, 1)")
        _check(
            isinstance(self.curvature_window, int) and self.curvature_window >= 1,
            "curvature_window", self.curvature_window, "an integer >= 1",
        )
        _check(0.0 < self.eps < 1.0, "eps", self.eps, "(0, 1)")
        _check(self.initial_lr >= 0.0 and math.isfinite(self.initial_lr), "initial_lr", self.initial_lr, "[0, inf)")
        _check(-1.0 < self.initial_momentum < 1.0, "initial_momentum", self.initial_momentum, "(-1, 1)")
        _check(
            self.clip_norm is None or (self.clip_norm > 0.0 and math.isfinite(self.clip_norm)),
            "clip_norm", self.clip_norm, "None or a finite number > 0",
        )
        _check(
            self.curvature_smoothing in ("log", "linear"),
            "curvature_smoothing", self.curvature_smoothing, "'log' or 'linear'",
        )
        for name in ("adaptive_clipping", "slow_start", "sparsity_correction", "update_first", "smooth_tuned"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: allowed range is {allowed}")


@dataclass(frozen=True)
class TunerState:
    """One tuner's memory. Averages are raw exponential moving averages (debiased when read)."""

    step: Tensor  # t: completed (non-skipped) steps
    skipped_steps: Tensor  # steps whose gradient held NaN or Inf
    curvatures: Tensor  # ring buffer of the last `curvature_window` samples ||g||^2
    h_max_avg: Tensor  # average of log(h_max + eps), or of h_max with linear smoothing
    h_min_avg: Tensor
    grad_sq_avg: Tensor  # average of ||g||^2
    grad_norm_avg: Tensor  # average of ||g||
    dist_avg: Tensor  # average of the distance samples
    density_avg: Tensor  # average fraction of non-zero gradient entries (sparsity correction)
    # The latest estimates; h_max doubles as the clipping threshold of the next step.
    h_min: Tensor
    h_max: Tensor
    grad_var: Tensor
    dist: Tensor
    # Tuned values: those the next (update-first) or the last (reference order) update used.
    mu: Tensor
    lr: Tensor
    # Additive correction to mu, driven from outside (the asynchronous closed loop).
    momentum_offset: Tensor

    @classmethod
    def initial(cls, settings: TunerSettings, device: torch.device | str | None = None) -> "TunerState":
        def scalar(value: float = 0.0) -> Tensor:
            return torch.tensor(value, dtype=torch.float64, device=device)

        values = {f.name: scalar() for f in fields(cls)}
        values["curvatures"] = torch.zeros(settings.curvature_window, dtype=torch.float64, device=device)
        values["mu"] = scalar(settings.initial_momentum)
        values["lr"] = scalar(settings.initial_lr)
        return cls(**values)

    def replace(self, **changes: Tensor) -> "TunerState":
        return dataclasses.replace(self, **changes)

    def select(self, keep_new: Tensor, old: "TunerState") -> "TunerState":
        """Field by field: self where keep_new is true, else old (no host synchronisation)."""
        return TunerState(**{
            f.name: torch.where(keep_new, getattr(self, f.name), getattr(old, f.name)) for f in fields(self)
        })

    @property
    def device(self) -> torch.device:
        return self.step.device

    def to(self, device) -> "TunerState":
        return TunerState(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict, settings: TunerSettings, device=None) -> "TunerState":
        """Rebuild a state from ``as_dict`` output, refusing anything that does not fit."""
        expected = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) != expected:
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"tuner state must have exactly the fields {sorted(expected)}, got {got}")
        for name, value in values.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"tuner state field {name!r} must be a tensor, got {type(value).__name__}")
            shape = (settings.curvature_window,) if name == "curvatures" else ()
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"tuner state field {name!r} has shape {tuple(value.shape)}, expected {shape} "
                    f"(curvature_window={settings.curvature_window})"
                )
        return cls(**{
            name: value.detach().to(device=device, dtype=torch.float64).clone() for name, value in values.items()
        })
