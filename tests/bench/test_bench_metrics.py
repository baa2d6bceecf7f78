import json
import math

import numpy as np
import pytest

from yellowfin.bench import metrics
from yellowfin.bench import results as results_io


def test_smooth_is_a_trailing_moving_average():
    np.testing.assert_allclose(metrics.smooth([1, 2, 3, 4, 5], window=2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(metrics.smooth([4.0] * 10, window=3), [4.0] * 10)
    assert metrics.smoothing_window(100) == 5 and metrics.smoothing_window(4000) == 100


def test_mean_curve_cuts_to_shortest_and_marks_divergence():
    curve = metrics.mean_curve([[1, 2, 3], [3, None, 5, 7]])
    assert curve[0] == 2 and math.isinf(curve[1]) and curve[2] == 4 and len(curve) == 3


def test_speedup_matches_the_paper_definition():
    steps = np.arange(1, 101)
    baseline = 1.0 / steps  # best value 0.01, first reached at iteration 100
    twice_as_fast = 1.0 / (2 * steps)  # reaches 0.01 at iteration 50
    assert metrics.best_point(baseline) == (pytest.approx(0.01), 100)
    assert metrics.steps_to_reach(twice_as_fast, 0.01) == 50
    assert metrics.speedup(baseline, twice_as_fast) == pytest.approx(2.0)
    assert metrics.speedup(twice_as_fast, baseline) is None  # the slower one never gets to 0.005
    assert metrics.speedup(baseline, baseline) == 1.0
    assert metrics.speedup(np.full(5, np.inf), baseline) is None


def test_atomic_write_and_read(tmp_path):
    path = results_io.run_path(tmp_path, "quadratic", "adam", seed=1, steps=10, lr=0.003)
    assert path.name == "adam_lr0.003_seed1_steps10.json"
    diverged_run = {"task": {"name": "quadratic", "metric": "excess_loss"}, "higher_is_better": False,
                    "optimizer": "adam", "kind": "tuned", "lr": 0.003, "seed": 1, "steps": 10, "completed_steps": 2,
                    "diverged": True, "wall": [0.1, 0.2], "eval": {}, "train_seconds": 0.2, "environment": {}}
    results_io.write_result(path, {**diverged_run, "loss": [1.0, results_io.finite_or_none(float("nan"))]})
    record = results_io.read_result(path)
    assert record["loss"] == [1.0, None] and record["schema"] == results_io.SCHEMA_VERSION
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind
    with pytest.raises(ValueError):  # NaN never reaches a file
        results_io.write_result(path, {**diverged_run, "loss": [float("nan")]})
    assert results_io.read_result(path)["loss"] == [1.0, None]  # the old file survived the failed write
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_unreadable_or_foreign_files_count_as_not_done(tmp_path):
    truncated = tmp_path / "t.json"
    truncated.write_text('{"schema": 1, "loss": [1.0, ')
    assert results_io.read_result(truncated) is None
    other = tmp_path / "o.json"
    other.write_text(json.dumps({"schema": 999}))
    assert results_io.read_result(other) is None
    assert results_io.read_result(tmp_path / "missing.json") is None


def _grid_record(lr, accuracy, diverged=False, val_loss=1.0):
    return {"lr": lr, "diverged": diverged, "higher_is_better": True, "task": {"metric": "accuracy"},
            "eval": {} if diverged else {"val": {"accuracy": accuracy, "loss": val_loss}}}


def test_best_lr_uses_validation_metric_and_skips_divergence():
    grid = [_grid_record(0.01, 0.80), _grid_record(0.1, 0.90), _grid_record(1.0, 0.0, diverged=True)]
    assert results_io.best_lr(grid) == 0.1
    tie = [_grid_record(0.3, 0.9, val_loss=0.5), _grid_record(0.1, 0.9, val_loss=0.4)]
    assert results_io.best_lr(tie) == 0.1
    assert results_io.best_lr([_grid_record(1.0, 0.0, diverged=True)]) is None
    lower = {"lr": 0.1, "diverged": False, "higher_is_better": False, "task": {"metric": "perplexity"},
             "eval": {"val": {"perplexity": 5.0, "loss": 1.6}}}
    assert results_io.best_lr([lower, {**lower, "lr": 1.0, "eval": {"val": {"perplexity": 3.0, "loss": 1.1}}}]) == 1.0


def test_exponential_smooth_is_the_bias_corrected_average_of_the_values_so_far():
    values = [3.0, 1.0, 4.0, 1.0, 5.0]
    beta = 0.9
    expected = [sum(beta ** (t - i) * values[i] for i in range(t + 1)) / sum(beta ** (t - i) for i in range(t + 1))
                for t in range(len(values))]
    np.testing.assert_allclose(metrics.exponential_smooth(values, beta), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics.exponential_smooth([2.0] * 7), [2.0] * 7)  # no start-up bias
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
        metrics.exponential_smooth(values, 1.0)
