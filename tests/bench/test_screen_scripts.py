"""benchmarks/paired.py and benchmarks/held_out.py on generated results files."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from yellowfin.bench import metrics
from yellowfin.bench.results import SCHEMA_VERSION, TUNED, UNTUNED, run_path, write_result

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
STEPS = 40


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(directory, task, optimizer, seed, loss, *, lr=None, val=None, exact=False, diverged=False):
    """A results file as the runner writes it, with a constant training loss (its smoothed end is ``loss``)."""
    curve = [loss] * STEPS
    record = {
        "schema": SCHEMA_VERSION, "task": {"name": task, "metric": "accuracy"}, "higher_is_better": True,
        "optimizer": optimizer, "kind": TUNED if lr is not None else UNTUNED, "lr": lr, "seed": seed, "steps": STEPS,
        "completed_steps": STEPS, "diverged": diverged, "loss": curve, "wall": [0.0] * STEPS,
        "eval": {"val": val if val is not None else {"loss": loss, "accuracy": 0.5}}, "train_seconds": 1.0,
        "environment": {}, "trace": {"effective_lr": [0.1] * STEPS},  # (a YellowFin run records its step)
    }
    if exact:
        record["exact_loss"] = [2.0 * loss] * STEPS  # (the quadratic's measure, which the scripts must prefer)
    write_result(run_path(directory, task, optimizer, seed, STEPS, lr), record)


def test_paired_differences_are_screen_minus_baseline_over_the_seeds_both_hold(tmp_path, capsys):
    paired = load("paired")
    for seed, (before, after) in enumerate([(1.0, 0.9), (2.0, 1.7), (3.0, 2.8)]):
        write_run(tmp_path / "base", "logreg", "yellowfin", seed, before)
        write_run(tmp_path / "screen", "logreg", "yellowfin", seed, after)
    write_run(tmp_path / "base", "logreg", "yellowfin", 7, 5.0)  # (no pair: left out)
    write_run(tmp_path / "base", "quadratic", "yellowfin", 0, 1.0, exact=True)
    write_run(tmp_path / "screen", "quadratic", "yellowfin", 0, 1.5, exact=True)
    write_run(tmp_path / "screen", "logreg", "other", 0, 100.0)  # (another optimizer: not read)
    assert paired.main([str(tmp_path / "base"), str(tmp_path / "screen")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    differences = [-0.1, -0.3, -0.2]
    error = (sum((d + 0.2) ** 2 for d in differences) / 2) ** 0.5 / math.sqrt(3)
    assert rows["logreg"].endswith(f"| {-0.2:+.2g} ± {error:.2g} |")
    assert "1, 2, 3 | 0.9, 1.7, 2.8" in rows["logreg"]
    assert rows["quadratic"].startswith("| quadratic | 2 | 3 | +1 ± nan |")  # the exact loss, not the batch loss


def test_paired_final_loss_of_a_diverged_run_is_infinite(tmp_path):
    paired = load("paired")
    write_run(tmp_path, "logreg", "yellowfin", 0, 1.0, diverged=True)
    assert paired.finals(tmp_path, "yellowfin") == {("logreg", 0): math.inf}
    write_run(tmp_path, "logreg", "yellowfin", 1, 0.25)
    expected = float(metrics.smooth([0.25] * STEPS, metrics.smoothing_window(STEPS))[-1])
    assert paired.finals(tmp_path, "yellowfin")[("logreg", 1)] == pytest.approx(expected)


def test_paired_refuses_directories_without_common_runs(tmp_path, capsys):
    paired = load("paired")
    write_run(tmp_path / "base", "logreg", "yellowfin", 0, 1.0)
    write_run(tmp_path / "screen", "logreg", "yellowfin", 1, 1.0)
    with pytest.raises(SystemExit):
        paired.main([str(tmp_path / "base"), str(tmp_path / "screen")])
    assert "no task and seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paired.main([str(tmp_path / "missing"), str(tmp_path / "screen")])


def test_held_out_shows_a_tuned_optimizer_at_the_learning_rate_run_on_every_seed(tmp_path, capsys):
    held_out = load("held_out")
    suite, ablation = tmp_path / "suite", tmp_path / "ablation"
    write_run(suite, "logreg", "sgd_momentum", 0, 9.0, lr=0.1, val={"loss": 9.0, "accuracy": 0.1})  # the grid
    for seed, accuracy in enumerate([0.8, 0.9, 1.0]):
        write_run(suite, "logreg", "sgd_momentum", seed, 1.0, lr=0.01, val={"loss": 1.0 + seed, "accuracy": accuracy})
        write_run(suite, "logreg", "yellowfin", seed, 1.0, val={"loss": 0.5, "accuracy": 0.75})
    write_run(ablation, "logreg", "yf_scale_free_dowg_clip_trigger_hold_average", 0, 1.0,
              val={"loss": 0.25, "accuracy": 0.95})
    assert held_out.main(["--results", str(suite), "--ablation", str(ablation)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| momentum SGD")]
    assert rows == ["| momentum SGD (tuned lr) | 2 ± 1 |", "| momentum SGD (tuned lr) | 0.9 ± 0.1 |"]
    assert "| YellowFin heavy ball (the default before §20), its average | 0.25 (1 seed) |" in out
    assert "| YellowFin default (primal-average form), the average of its gradient points (§24) | 0.5 ± 0 |" in out
    assert "| Prodigy | – |" in out
    assert "logreg (accuracy)" in out


def test_paired_reads_a_prototypes_runs_at_the_point_handed_out_or_at_its_iterate(tmp_path):
    paired = load("paired")
    for task, steps in (("quadratic", STEPS), ("logreg", STEPS)):
        (tmp_path / task).mkdir()
        run = {"task": task, "variant": "proto", "seed": 0, "steps": steps, "losses": [3.0] * steps,
               "exact_loss": [0.5] * steps if task == "quadratic" else None,
               "exact_loss_at_iterate": [0.7] * steps if task == "quadratic" else None}
        (tmp_path / task / "proto_seed0.json").write_text(json.dumps(run))
    (tmp_path / "logreg" / "other_seed0.json").write_text(json.dumps({**run, "variant": "other"}))
    assert paired.screen_finals("proto", root=tmp_path) == {("quadratic", 0): pytest.approx(0.5),
                                                            ("logreg", 0): pytest.approx(3.0)}
    assert paired.screen_finals("proto", at_iterate=True, root=tmp_path)[("quadratic", 0)] == pytest.approx(0.7)
    run["losses"][-1] = None  # (a diverged run: the runner writes its non-finite losses as None)
    (tmp_path / "logreg" / "proto_seed0.json").write_text(json.dumps(run))
    assert paired.screen_finals("proto", root=tmp_path)[("logreg", 0)] == math.inf


def test_plateau_escape_is_the_first_step_where_the_running_mean_falls_below_the_level():
    escape = load("plateau_escape")
    window = escape.WINDOW
    plateau, below = [0.49] * 100, [0.40] * 100
    # The running mean of the window first drops below 0.45 once more than (0.49 - 0.45) / 0.09 of it is below.
    needed = math.floor(window * (0.49 - escape.ESCAPED_BELOW) / (0.49 - 0.40)) + 1
    assert escape.escape_step(plateau + below) == 100 + needed - 1
    assert escape.escape_step(plateau * 3) is None
    assert escape.escape_step(below[: window - 1]) is None  # (no full window yet)


def test_plateau_escape_median_counts_a_run_that_stayed_as_later_than_any_that_left():
    escape = load("plateau_escape")
    assert escape.median_escape([300, None, 100]) == 300
    assert escape.median_escape([300, None, None]) is None
    assert escape.median_escape([100, 200, 300, None]) == 250


def test_plateau_escape_keeps_each_run_and_reads_it_back_instead_of_rerunning(tmp_path, monkeypatch, fmnist_dir):
    escape = load("plateau_escape")
    runs = tmp_path / "runs"
    record = escape.run("primal_average", 0, escape.WINDOW, out=runs, data_dir=str(fmnist_dir), batch_size=16)
    path = runs / f"primal_average_seed0_steps{escape.WINDOW}.json"
    assert json.loads(path.read_text()) == record and len(record["losses"]) == escape.WINDOW
    assert list(runs.iterdir()) == [path]  # (no temporary left behind)
    monkeypatch.setattr(escape, "get_task", lambda *a, **k: pytest.fail("a kept run was trained again"))
    assert escape.run("primal_average", 0, escape.WINDOW, out=runs) == record


def test_handed_out_point_evaluates_the_forms_own_average_and_the_gradient_points_average(tmp_path, capsys):
    # Its xbar, formed from the buffer, is what average=False hands out on the same trajectory; its y's average is what
    # the default hands out; a second run keeps the file it wrote.
    import torch

    from yellowfin import YellowFin
    from yellowfin.bench.tasks import get_task

    handed_out_point = load("handed_out_point")
    handed_out_point.main(["--tasks", "quadratic", "--seeds", "0", "--steps", "30", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "quadratic" / "plain_seed0.json").read_text())
    task = get_task("quadratic")
    for average, point in ((False, "xbar"), (True, "ybar")):
        torch.manual_seed(0)
        model = task.make_model(0)
        opt = YellowFin(model.parameters(), average=average)
        batches = task.train_batches(0)
        for _ in range(30):
            opt.zero_grad()
            task.loss(model, next(batches)).backward()
            opt.step()
        with opt.averaged():
            assert record["test"][point]["excess_loss"] == pytest.approx(task.exact_loss(model), rel=1e-12)
    assert record["test"]["y"]["excess_loss"] == pytest.approx(task.exact_loss(model), rel=1e-12)
    parts = record["test"]["ybar"]
    assert parts["flat"] + parts["stiff"] == pytest.approx(parts["excess_loss"], rel=1e-12)
    assert "the y's polynomial average" in (tmp_path / "handed_out_point.md").read_text()
    handed_out_point.main(["--tasks", "quadratic", "--seeds", "0", "--steps", "30", "--out", str(tmp_path)])
    assert "kept" in capsys.readouterr().out
