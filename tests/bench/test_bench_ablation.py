import dataclasses
import math
import re
import statistics

import pytest
import torch

from yellowfin import YellowFin
from yellowfin.bench import ablation, metrics
from yellowfin.bench import results as results_io
from yellowfin.bench.runner import SuiteConfig, run_suite
from yellowfin.bench.variants import VARIANT_SPECS, VARIANTS, Variant, get_variant, register_variant
from yellowfin.cli import EXIT_BAD_INPUT, main
from yellowfin.state import TunerSettings

STEPS = 5


def _ablate(results_dir, variants, seeds=(0, 1), **overrides):
    config = ablation.AblationConfig(tasks=["quadratic"], variants=variants, seeds=seeds, steps=STEPS,
                                     results_dir=results_dir, progress=False, **overrides)
    return ablation.run_ablation(config, log=lambda message: None)


def _row(table, name):
    return next(line for line in table.splitlines() if line.startswith(f"| {name} |")).strip("|").split(" | ")


def test_variants_by_seeds_write_results_files_resume_and_tabulate(tmp_path):
    results_dir = tmp_path / "ablation"
    outcome = _ablate(results_dir, ["reference", "paper"])
    assert sorted(p.name for p in outcome.ran) == sorted(
        f"yf_{variant}_seed{seed}_steps{STEPS}.json" for variant in ("reference", "paper") for seed in (0, 1))
    again = _ablate(results_dir, ["reference", "paper"])
    assert again.ran == [] and len(again.skipped) == 4

    table, path = ablation.write_table(results_dir, baseline_dirs=[])
    assert path.read_text() == table
    window = metrics.smoothing_window(STEPS)
    for variant in ("reference", "paper"):
        finals = [metrics.smooth(results_io.read_result(results_dir / "quadratic" /
                                                        f"yf_{variant}_seed{seed}_steps{STEPS}.json")["exact_loss"],
                                 window)[-1] for seed in (0, 1)]
        row = _row(table, variant)
        assert row[2] == "2"
        assert row[3] == f"{statistics.fmean(finals):.4g} ± {statistics.stdev(finals):.2g}"
        assert row[4].strip() == "no baseline results"


def test_a_variant_whose_setting_is_infinite_writes_its_results_file(tmp_path):
    # (relative_clip=math.inf turns the clip off; JSON has no infinity, so the file records the string)
    assert VARIANTS["scale_free_dowg_average"].overrides["relative_clip"] == math.inf
    outcome = _ablate(tmp_path, ["scale_free_dowg_average"], seeds=(0,))
    record = results_io.read_result(outcome.ran[0])
    assert record["hyper"]["relative_clip"] == "inf" and float(record["hyper"]["relative_clip"]) == math.inf


def test_a_description_with_norms_stays_in_its_cell(tmp_path):
    # scale_free_dog's description holds ||g||: unescaped, each pipe would start a new cell of the table.
    assert "||" in VARIANTS["scale_free_dog"].description
    results_dir = tmp_path / "ablation"
    _ablate(results_dir, ["scale_free_dog"], seeds=(0,))
    table, _ = ablation.write_table(results_dir, baseline_dirs=[])
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| variant | what it changes |"))
    row = next(line for line in lines if line.startswith("| scale_free_dog |"))
    cells = [line.replace("\\|", "").count("|") for line in (header, row)]
    assert cells[0] == cells[1]


def test_the_overview_puts_every_variant_on_every_task_in_one_row(tmp_path):
    results_dir = tmp_path / "ablation"
    _ablate(results_dir, ["reference", "paper"])
    table, _ = ablation.write_table(results_dir, baseline_dirs=[])
    per_task, overview = table.split("#### Overview")
    assert "| variant | quadratic |" in overview
    for variant in ("reference", "paper"):
        mean = _row(per_task, variant)[3].split(" ± ")[0]
        assert f"| {variant} | {mean} |" in overview  # the same mean; no speedup without a baseline


def test_speedup_against_tuned_momentum_sgd_from_another_results_directory(tmp_path):
    suite_dir = tmp_path / "suite"
    run_suite(SuiteConfig(tasks=["quadratic"], optimizers=["sgd_momentum"], seeds=(0, 1), steps=STEPS,
                          results_dir=suite_dir, progress=False), log=lambda message: None)
    results_dir = tmp_path / "ablation"
    _ablate(results_dir, ["reference"])
    summary = ablation.ablation_summaries(results_dir, [suite_dir])[0]
    expected = metrics.speedup(summary.optimizers["sgd_momentum"].curve, summary.optimizers["yf_reference"].curve)
    table, _ = ablation.write_table(results_dir, [suite_dir])
    assert _row(table, "reference")[4].strip() == ("never" if expected is None else f"{expected:.2f}")
    assert _row(table, "sgd_momentum")[4].strip() == "1.00"  # the baseline against itself
    assert not list(results_dir.rglob("sgd_momentum*"))  # read from the suite's directory, not run again


def test_tuned_adam_and_dog_are_shown_beside_the_variants_when_their_runs_exist(tmp_path):
    suite_dir = tmp_path / "suite"
    run_suite(SuiteConfig(tasks=["quadratic"], optimizers=["sgd_momentum", "dog"], seeds=(0,), steps=STEPS,
                          results_dir=suite_dir, progress=False), log=lambda message: None)
    results_dir = tmp_path / "ablation"
    _ablate(results_dir, ["reference"], seeds=(0,))
    table, _ = ablation.write_table(results_dir, [suite_dir])
    assert _row(table, "dog")[1] == "its defaults"
    overview = table.split("#### Overview")[1]
    assert "| DoG (1 seed) |" in overview and "| tuned momentum SGD |" in overview
    assert "| tuned Adam |" not in overview  # not run: no row


def test_a_peers_row_names_how_many_seeds_it_ran_on_each_task(tmp_path):
    suite_dir = tmp_path / "suite"
    for task, seeds in (("quadratic", (0, 1)), ("digits_mlp", (0,))):
        run_suite(SuiteConfig(tasks=[task], optimizers=["dog"], seeds=seeds, steps=STEPS, results_dir=suite_dir,
                              progress=False, peers_on_every_seed=True), log=lambda message: None)
    results_dir = tmp_path / "ablation"
    config = ablation.AblationConfig(tasks=["quadratic"], variants=["reference"], seeds=(0,), steps=STEPS,
                                     results_dir=results_dir, progress=False)
    ablation.run_ablation(config, log=lambda message: None)
    overview = ablation.write_table(results_dir, [suite_dir])[0].split("#### Overview")[1]
    assert "| DoG (2 seeds) |" in overview  # (only the quadratic has variant runs)
    ablation.run_ablation(dataclasses.replace(config, tasks=["quadratic", "digits_mlp"]), log=lambda message: None)
    overview = ablation.write_table(results_dir, [suite_dir])[0].split("#### Overview")[1]
    assert "| DoG (1-2 seeds) |" in overview


def test_the_control_replays_its_variants_effective_step(tmp_path, monkeypatch):
    seen = []
    original_step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr("torch.optim.SGD.step", spy)
    outcome = _ablate(tmp_path, ["control"], seeds=(0,))
    assert sorted(p.name for p in outcome.ran) == [f"yf_control_seed0_steps{STEPS}.json",
                                                   f"yf_reference_seed0_steps{STEPS}.json"]
    reference = results_io.read_result(tmp_path / "quadratic" / f"yf_reference_seed0_steps{STEPS}.json")
    assert seen == reference["trace"]["effective_lr"]


def test_variants_build_what_they_say():
    params = [torch.nn.Parameter(torch.zeros(3))]

    def settings(optimizer):  # what the tuner runs with (beta=None reads as the tuner's own memory)
        return YellowFin._settings(optimizer.param_groups[0])

    reference, default = YellowFin.reference_variant(params), YellowFin(params)
    # "reference" builds the authors' algorithm, pinned; "default" builds whatever YellowFin() does, which is now the
    # scale-free tuner with its DoWG rule and relative clip: the two differ.
    assert get_variant("reference").build(params).defaults == reference.defaults
    assert settings(get_variant("reference").build(params)) == settings(reference)
    assert settings(reference).tuner == "reference" and settings(reference).beta == 0.999
    assert get_variant("default").build(params).defaults == default.defaults
    assert settings(get_variant("default").build(params)) == settings(default) == TunerSettings()
    assert settings(default).tuner == "scale_free" and settings(default).step_rule == "dowg"
    assert settings(default).beta == 0.99 and settings(default).relative_clip == 2.0
    assert settings(default) == settings(YellowFin(params, tuner="scale_free"))
    assert settings(default) != settings(reference)
    assert get_variant("paper").build(params).defaults == YellowFin.paper_variant(params).defaults
    # The single changes are made on top of the reference, whatever the defaults.
    no_ramp = get_variant("no_slow_start").build(params)
    assert settings(no_ramp) == dataclasses.replace(settings(reference), slow_start=False)
    assert no_ramp.defaults == {**reference.defaults, "slow_start": False}
    assert settings(get_variant("scale_free").build(params)).beta == 0.999  # the variant pins its memory
    # The default is the clipped DoWG variant with the distance hold in primal-average form, its clip acting on every
    # gradient above its level; before that form became the default, it ran heavy ball with the clip's trigger at
    # 10x the RMS, and the variants were measured on that (with the average, which only changes the point handed out).
    # Since the form keeps the average of its gradient points by default, the form's own average is average=False.
    assert settings(default) == settings(
        get_variant("scale_free_dowg_clip_hold_primal_average_average").build(params))
    assert dataclasses.replace(settings(default), average=False) == settings(
        get_variant("scale_free_dowg_clip_hold_primal_average").build(params))
    assert settings(default).momentum_form == "primal_average" and settings(default).clip_trigger == 2.0
    scale_free_default = settings(YellowFin(params, momentum_form="heavy_ball"))
    # Every scale-free variant pins the rule and clip it was measured with.
    assert settings(get_variant("scale_free").build(params)).step_rule == "secant"
    for name, rule, start in (("scale_free_beta_0.99", "secant", 1e-6), ("scale_free_dog", "dog", 1e-3),
                              ("scale_free_dowg", "dowg", 1e-3)):
        assert settings(get_variant(name).build(params)) == dataclasses.replace(
            scale_free_default, step_rule=rule, relative_clip=math.inf, clip_trigger=math.inf, initial_distance=start,
            hold_distance_uphill=False)
    # ... and its first move, growth cap, distance hold, form and average, so that new defaults leave what each
    # variant's runs measured as they were. (the variants named "..._start_<r>..." measure another start r, those named
    # "..._growth_cap..." the cap, "..._hold..." the hold, "..._primal_average" the form)
    for variant in VARIANTS.values():
        if variant.overrides.get("tuner") == "scale_free":
            named = re.search(r"_start_([0-9.e-]+?)(_|$)", variant.name)
            measured = 1e-6 if variant.overrides["step_rule"] == "secant" else 1e-3
            assert variant.overrides["initial_distance"] == (float(named.group(1)) if named else measured)
            assert variant.overrides["growth_cap"] == ("_growth_cap" in variant.name)
            assert variant.overrides["hold_distance_uphill"] == ("_hold" in variant.name)
            assert variant.overrides["momentum_form"] == ("primal_average" if "_primal_average" in variant.name
                                                          else "heavy_ball")
            # ("..._average" names the average handed out, "..._primal_average" alone the form)
            assert variant.overrides["average"] == bool(re.search(r"(?<!primal)_average(_|$)", variant.name))
    clipped = settings(get_variant("scale_free_dowg_clip_average").build(params))
    assert clipped == dataclasses.replace(scale_free_default, average=True, clip_trigger=2.0,  # (as first measured)
                                          hold_distance_uphill=False)
    triggered = settings(get_variant("scale_free_dowg_clip_trigger_average").build(params))
    assert triggered == dataclasses.replace(scale_free_default, average=True, hold_distance_uphill=False)
    capped = settings(get_variant("scale_free_dowg_clip_trigger_growth_cap_average").build(params))
    assert capped == dataclasses.replace(scale_free_default, average=True, growth_cap=True, hold_distance_uphill=False)
    held = settings(get_variant("scale_free_dowg_clip_trigger_hold_average").build(params))
    assert held == dataclasses.replace(scale_free_default, average=True)  # (the default, with the average)
    spec = VARIANT_SPECS["yf_reference"]
    assert spec.records_tuner_trace and spec.every_seed and not spec.highlight
    assert VARIANT_SPECS["yf_control"].replays == "yf_reference"


def test_registering_a_variant_checks_its_name_and_what_it_controls():
    with pytest.raises(ValueError, match="registered already"):
        register_variant(Variant("paper", "again"))
    with pytest.raises(ValueError, match="letters, digits"):
        register_variant(Variant("a/b", "a path"))
    with pytest.raises(ValueError, match="controls 'nowhere', which is not registered"):
        register_variant(Variant("control_nowhere", "?", control_of="nowhere"))
    assert "control_nowhere" not in VARIANTS and "a/b" not in VARIANTS


def test_ablate_command_runs_and_prints_the_table(tmp_path, capsys):
    results_dir = tmp_path / "ablation"
    argv = ["ablate", "quadratic", "--variants", "reference", "paper", "--steps", "3", "--seeds", "0", "1",
            "--results", str(results_dir), "--baseline-results", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs done, 0 already there" in out and "#### quadratic (3 steps)" in out
    assert "| reference |" in out and "| paper |" in out
    assert (results_dir / "ablation.md").is_file()
    assert main(argv) == 0
    assert "0 runs done, 4 already there" in capsys.readouterr().out

    assert main(["ablate", "quadratic", "--variants", "reference", "bogus", "--no-progress"]) == EXIT_BAD_INPUT
    assert "unknown variant bogus; choose from reference, default, paper, control" in capsys.readouterr().err


def test_the_speedup_against_tuned_adam_has_its_own_column_and_overview(tmp_path):
    suite_dir = tmp_path / "suite"
    run_suite(SuiteConfig(tasks=["quadratic"], optimizers=["adam", "prodigy"], seeds=(0,), steps=STEPS,
                          results_dir=suite_dir, progress=False), log=lambda message: None)
    results_dir = tmp_path / "ablation"
    _ablate(results_dir, ["reference"], seeds=(0,))
    summary = ablation.ablation_summaries(results_dir, [suite_dir])[0]
    expected = metrics.speedup(summary.optimizers["adam"].curve, summary.optimizers["yf_reference"].curve)
    table, _ = ablation.write_table(results_dir, [suite_dir])
    assert _row(table, "reference")[4].strip() == "no baseline results"  # no tuned momentum SGD here
    assert _row(table, "reference")[5].strip() == ("never" if expected is None else f"{expected:.2f}")
    assert _row(table, "adam")[5].strip() == "1.00"
    against_adam = table.split("#### Against tuned Adam")[1]
    assert "| Prodigy (1 seed) |" in against_adam and "| reference |" in against_adam
    peers = table.split("#### Against the tuning-free peers")[1]
    won = ablation.beats_peer(summary, "yf_reference", "prodigy")
    cells = [cell.strip() for cell in _row(peers, "reference")[1:]]
    assert cells == ["Prodigy", "W" if won else "L", f"{int(won)} of 1"]


def test_a_peer_is_beaten_by_the_iterations_to_tuned_adams_best_or_else_by_the_final_loss():
    from yellowfin.bench.report import OptimizerSummary, TaskSummary

    def optimizer(name, curve):
        return OptimizerSummary(name, name, "untuned", None, [{"loss": curve, "seed": 0}],
                                metrics.smooth(curve, 1))

    adam = [3.0, 2.0, 1.0, 1.0]  # best 1.0, first reached at iteration 3
    curves = {"adam": adam, "yf_fast": [3.0, 1.0, 0.5, 0.5], "yf_as_fast_lower": [3.0, 2.0, 0.9, 0.8],
              "yf_as_fast_higher": [3.0, 2.0, 0.9, 0.95], "yf_never_low": [3.0, 2.0, 1.5, 1.2],
              "yf_never_high": [3.0, 2.0, 1.5, 1.4], "prodigy": [3.0, 2.0, 1.0, 0.9], "dog": [3.0, 2.0, 1.5, 1.3]}
    summary = TaskSummary("quadratic", 4, "loss", False, {n: optimizer(n, c) for n, c in curves.items()}, "adam", 1)
    assert ablation.beats_peer(summary, "yf_fast", "prodigy")  # both reach it: 2 iterations against 3
    assert ablation.beats_peer(summary, "yf_as_fast_lower", "prodigy")  # as many: the lower final loss
    assert not ablation.beats_peer(summary, "yf_as_fast_higher", "prodigy")
    assert not ablation.beats_peer(summary, "yf_never_low", "prodigy")  # only the peer reaches it
    assert ablation.beats_peer(summary, "yf_fast", "dog")  # only the variant does
    assert ablation.beats_peer(summary, "yf_never_low", "dog")  # neither: the lower final loss
    assert not ablation.beats_peer(summary, "yf_never_high", "dog")
    assert ablation.beats_peer(summary, "yf_fast", "schedulefree_adamw") is None  # (no runs of that peer)
    without_adam = dataclasses.replace(summary, optimizers={n: o for n, o in summary.optimizers.items() if n != "adam"})
    assert ablation.beats_peer(without_adam, "yf_fast", "prodigy") is None
