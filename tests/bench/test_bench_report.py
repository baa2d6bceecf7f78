import math

import numpy as np
import pytest

from yellowfin.bench import report, robustness
from yellowfin.bench.runner import SuiteConfig, run_suite


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("results") / "results-tiny"
    config = SuiteConfig(tasks=["quadratic", "digits_mlp"],
                         optimizers=["yellowfin", "sgd_momentum", "adam", "sgd_yf_step"],
                         seeds=(0, 1), steps=6, results_dir=directory, progress=False,
                         task_options={"digits_mlp": {"hidden": 8}})
    run_suite(config, log=lambda message: None)
    return directory


def test_summaries_choose_lr_on_validation_and_compare_against_best_tuned(results_dir):
    from yellowfin.bench import results as results_io

    summaries = {s.task: s for s in report.summarize(results_io.load_results(results_dir))}
    assert set(summaries) == {"quadratic", "digits_mlp"}
    digits = summaries["digits_mlp"]
    assert list(digits.optimizers) == ["yellowfin", "sgd_momentum", "adam", "sgd_yf_step"]
    assert digits.reference in ("sgd_momentum", "adam")
    for name in ("sgd_momentum", "adam"):
        opt = digits.optimizers[name]
        assert len(opt.grid) == 5 and opt.seeds == [0, 1]  # the grid, then the chosen lr on every seed
        best_lr = min(opt.grid, key=lambda item: item[1])[0]
        assert opt.lr == best_lr
    assert digits.speedup_against_reference(digits.reference) == 1.0
    assert digits.optimizers["yellowfin"].seeds == [0, 1]
    assert digits.objective == "training loss"
    assert summaries["quadratic"].objective.startswith("exact")  # compared on f(x) - f(x*), no noise floor


def test_report_writes_tables_and_figures_and_keeps_hand_written_text(results_dir, tmp_path):
    markdown = tmp_path / "docs" / "benchmarks.md"
    markdown.parent.mkdir()
    markdown.write_text("# Benchmarks\n\nHand-written reading.\n", encoding="utf-8")
    figures = tmp_path / "docs" / "figures"
    written = report.write_report([results_dir], markdown, figures, robustness=False)
    text = markdown.read_text()
    assert "Hand-written reading." in text
    assert "<!-- BEGIN GENERATED: results-tiny -->" in text
    assert "| optimizer | lr | seeds |" in text and "#### quadratic (6 steps)" in text
    assert "YellowFin (defaults)" in text and "Momentum SGD" in text
    for figure in written["figures"]:
        assert figure.is_file() and figure.stat().st_size > 1000
        assert f"figures/{figure.name}" in text  # linked relative to the markdown file
    names = {f.name for f in written["figures"]}
    assert {"results-tiny-quadratic-6-loss.png", "results-tiny-quadratic-6-yellowfin.png",
            "results-tiny-speedup.png"} <= names

    markdown.write_text(text + "\nMore reading after the tables.\n")
    report.write_report([results_dir], markdown, figures, robustness=False)
    regenerated = markdown.read_text()
    assert regenerated.count("<!-- BEGIN GENERATED: results-tiny -->") == 1
    assert "More reading after the tables." in regenerated and "Hand-written reading." in regenerated


def test_splice_replaces_only_its_own_block():
    doc = report.splice("intro\n", "a", "first")
    doc = report.splice(doc, "b", "second")
    doc = report.splice(doc, "a", "third")
    assert "first" not in doc and "third" in doc and "second" in doc and doc.startswith("intro")


def test_machine_line_names_every_thread_count_when_a_suite_mixes_them():
    def record(task, threads):
        return {"task": {"name": task}, "environment": {"torch_threads": threads}}

    assert report._threads_text([record("a", 2), record("b", 2)]) == "2 torch threads"
    mixed = report._threads_text([record("a", 2), record("b", 2), record("b", 1)])
    assert mixed == "torch threads per run: 2 in 2 runs (a, b); 1 in 1 run (b)"


def test_measured_rate_is_sqrt_mu_inside_the_robust_region():
    for mu in (0.25, 0.81):
        low, high = (1 - math.sqrt(mu)) ** 2, (1 + math.sqrt(mu)) ** 2
        for alpha in np.geomspace(low * 1.05, high * 0.95, 4):
            assert robustness.measured_rate(alpha, mu, [1.0]) == pytest.approx(math.sqrt(mu), abs=0.02)
        outside = low * 0.3  # too small a step: slower than sqrt(mu), as theory says
        measured = robustness.measured_rate(outside, mu, [1.0])
        assert measured > math.sqrt(mu) + 0.02
        assert measured == pytest.approx(robustness.theory_rate(outside, mu, [1.0]), abs=0.02)
    assert robustness.measured_rate(3.0, 0.0, [1.0]) > 1.5  # divergence shows as a rate above 1


def test_robustness_figure(tmp_path):
    data = robustness.compute(momenta=(0.0, 0.5), n_alphas=9, n_curvatures=4, n_mu=5, steps=200)
    flatness = robustness.robust_region_flatness(data)
    assert set(flatness) == {0.5} and flatness[0.5] < 0.03
    # panel (b): above mu*, every curvature sits in the robust region and the rate is sqrt(mu)
    above = data.sweep_mu > 0.7
    np.testing.assert_allclose(data.sweep_measured[above], np.sqrt(data.sweep_mu[above]), atol=0.03)
    path = robustness.plot(data, tmp_path / "robustness.png")
    assert path.is_file() and path.stat().st_size > 1000
