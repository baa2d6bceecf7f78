"""The paper's comparison metrics, on per-step training-loss curves.

Speedup of method M over baseline B (Zhang et al., section 5): let target = B's best smoothed training loss and
n_B the iterations B needs to first reach it; n_M the iterations M needs to reach the same value.
speedup = n_B / n_M (> 1: M is faster; None: M never reaches B's best within its budget).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def smoothing_window(n_steps: int) -> int:
    """Trailing moving-average width: 1/40 of the run, at least 5 steps (mini-batch losses are noisy)."""
    return max(5, n_steps // 40)


def smooth(losses: Sequence[float], window: int | None = None) -> np.ndarray:
    """Trailing moving average; the first window-1 points average what is available so far."""
    values = np.asarray(losses, dtype=np.float64)
    if values.size == 0:
        return values
    window = window or smoothing_window(values.size)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def exponential_smooth(losses: Sequence[float], beta: float = 0.95) -> np.ndarray:
    """Bias-corrected exponential moving average (as Adam corrects its moments): step t averages the first t
    values with weights proportional to beta^(t-i). The asynchrony experiments smooth their curves this way."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    values = np.asarray(losses, dtype=np.float64)
    out = np.empty_like(values)
    average = 0.0
    for index, value in enumerate(values):
        average = beta * average + (1.0 - beta) * value
        out[index] = average / (1.0 - beta ** (index + 1))
    return out


def mean_curve(curves: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Per-step mean over seeds, cut to the shortest run; a diverged step (None/NaN) makes the mean infinite."""
    if not curves:
        return np.empty(0)
    length = min(len(c) for c in curves)
    stacked = np.array([[math.inf if v is None else v for v in c[:length]] for c in curves], dtype=np.float64)
    stacked[~np.isfinite(stacked)] = math.inf
    return stacked.mean(axis=0)


def steps_to_reach(smoothed: np.ndarray, target: float) -> int | None:
    """1-based count of iterations until the smoothed loss first gets to target or below; None if never."""
    hits = np.flatnonzero(smoothed <= target)
    return int(hits[0]) + 1 if hits.size else None


def best_point(smoothed: np.ndarray) -> tuple[float, int] | None:
    """(best smoothed loss, iterations to first reach it); None for an empty or wholly diverged curve."""
    finite = np.where(np.isfinite(smoothed), smoothed, np.inf)
    if finite.size == 0 or not np.isfinite(finite).any():
        return None
    index = int(np.argmin(finite))
    return float(finite[index]), index + 1


def speedup(baseline: np.ndarray, method: np.ndarray) -> float | None:
    """n_baseline / n_method to reach the baseline's best smoothed loss (inputs already smoothed)."""
    best = best_point(baseline)
    if best is None:
        return None
    target, n_baseline = best
    n_method = steps_to_reach(method, target)
    return None if n_method is None else n_baseline / n_method
