import json
from pathlib import Path

import pytest
import torch

from yellowfin.bench import results as results_io
from yellowfin.bench import runner
from yellowfin.bench.optimizers import OPTIMIZERS, get_optimizer_spec, resolve_optimizers
from yellowfin.bench.runner import SuiteConfig, run_suite, train_run
from yellowfin.bench.tasks import get_task


def test_train_run_records_losses_evaluation_and_yellowfin_trace():
    task = get_task("digits_mlp", hidden=16)
    record = train_run(task, get_optimizer_spec("yellowfin"), seed=0, steps=12)
    assert record["completed_steps"] == 12 and len(record["loss"]) == len(record["wall"]) == 12
    assert record["wall"] == sorted(record["wall"])
    assert not record["diverged"]
    assert set(record["eval"]) == {"val", "test"} and 0 <= record["eval"]["test"]["accuracy"] <= 1
    trace = record["trace"]
    assert all(len(trace[k]) == 12 for k in ("mu", "lr", "applied_momentum", "effective_lr", "h_min", "h_max"))
    assert all(0 < lo <= hi for lo, hi in zip(trace["h_min"][1:], trace["h_max"][1:]))
    for alpha, mu, effective in zip(trace["lr"], trace["applied_momentum"], trace["effective_lr"]):
        assert effective == pytest.approx(alpha / (1 - mu))
    assert record["environment"]["packages"]["torch"]
    json.dumps(record, allow_nan=False)  # storable as is


def test_quadratic_records_its_exact_objective_every_step():
    task = get_task("quadratic")
    record = train_run(task, get_optimizer_spec("sgd_momentum"), seed=0, steps=30, lr=3e-3)
    exact = record["exact_loss"]
    assert len(exact) == 30 and exact[-1] < exact[0]
    assert exact[-1] == pytest.approx(record["eval"]["test"]["excess_loss"])  # both at the final point
    assert "exact_loss" not in train_run(get_task("digits_mlp", hidden=8), get_optimizer_spec("adam"), 0, 2, lr=1e-3)


def test_train_run_replays_a_step_size_schedule(monkeypatch):
    task = get_task("quadratic")
    seen = []
    original_step = __import__("torch").optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr("torch.optim.SGD.step", spy)
    record = train_run(task, get_optimizer_spec("sgd_yf_step"), seed=0, steps=5, lr_schedule=[1e-3, 2e-3, 3e-3])
    assert seen == [1e-3, 2e-3, 3e-3, 3e-3, 3e-3]  # the schedule, then its last value
    assert "trace" not in record


def test_divergence_is_recorded_not_raised():
    record = train_run(get_task("quadratic"), get_optimizer_spec("sgd_momentum"), seed=0, steps=400, lr=1.0)
    assert record["diverged"] and record["completed_steps"] < 400
    assert record["loss"][-1] is None and record["eval"] == {}
    json.dumps(record, allow_nan=False)


def test_suite_order_puts_the_control_after_yellowfin():
    names = [s.name for s in resolve_optimizers(["sgd_yf_step", "adam", "yellowfin"])]
    assert names.index("sgd_yf_step") > names.index("yellowfin")


def _config(tmp_path, tiny_task_options, **overrides):
    options = dict(tasks=["quadratic", "char_lstm"], optimizers=["yellowfin", "sgd_momentum", "sgd_yf_step"],
                   seeds=(0, 1), steps=4, results_dir=tmp_path / "results", task_options=tiny_task_options,
                   progress=False)
    options.update(overrides)
    return SuiteConfig(**options)


def test_suite_writes_one_file_per_run_and_resumes(tmp_path, tiny_task_options):
    config = _config(tmp_path, tiny_task_options)
    outcome = run_suite(config, log=lambda message: None)
    names = sorted(p.relative_to(config.results_dir).as_posix() for p in outcome.ran)
    quadratic_grid = get_task("quadratic").lr_grids["sgd_momentum"]
    chosen = outcome.chosen_lr[("quadratic", "sgd_momentum")]
    assert chosen in quadratic_grid
    expected_quadratic = (
        {f"quadratic/yellowfin_seed{s}_steps4.json" for s in (0, 1)}
        | {f"quadratic/sgd_yf_step_seed{s}_steps4.json" for s in (0, 1)}
        | {f"quadratic/sgd_momentum_lr{lr:g}_seed0_steps4.json" for lr in quadratic_grid}
        | {f"quadratic/sgd_momentum_lr{chosen:g}_seed1_steps4.json"}
    )
    assert expected_quadratic == {n for n in names if n.startswith("quadratic/")}
    assert len(outcome.ran) == runner.planned_run_count(config, resolve_optimizers(config.optimizers),
                                                        [get_task(t, **tiny_task_options[t]) for t in config.tasks])
    control = results_io.read_result(config.results_dir / "quadratic/sgd_yf_step_seed1_steps4.json")
    reference = results_io.read_result(config.results_dir / "quadratic/yellowfin_seed1_steps4.json")
    assert control["kind"] == "control" and reference["trace"]["effective_lr"]
    assert not list(config.results_dir.rglob("*.tmp"))

    again = run_suite(config, log=lambda message: None)
    assert again.ran == [] and len(again.skipped) == len(outcome.ran)


@pytest.mark.parametrize("every_seed", [False, True])
def test_the_tuning_free_peers_run_on_the_first_seed_unless_asked_for_every_seed(tmp_path, every_seed):
    config = SuiteConfig(tasks=["quadratic"], optimizers=["dog", "yellowfin"], seeds=(1, 2), steps=4,
                         results_dir=tmp_path, progress=False, peers_on_every_seed=every_seed)
    outcome = run_suite(config, log=lambda message: None)
    names = {p.name for p in outcome.ran}
    peer_seeds = (1, 2) if every_seed else (1,)
    assert names == ({f"dog_seed{s}_steps4.json" for s in peer_seeds}
                     | {f"yellowfin_seed{s}_steps4.json" for s in (1, 2)})
    assert len(outcome.ran) == runner.planned_run_count(config, resolve_optimizers(config.optimizers),
                                                        [get_task("quadratic")])


def test_interrupted_suite_keeps_finished_runs_and_resumes(tmp_path, tiny_task_options, monkeypatch):
    config = _config(tmp_path, tiny_task_options, tasks=["quadratic"])
    real_train_run = runner.train_run
    calls = {"n": 0}

    def interrupt_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_train_run(*args, **kwargs)

    monkeypatch.setattr(runner, "train_run", interrupt_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_suite(config, log=lambda message: None)
    finished = sorted(config.results_dir.rglob("*.json"))
    assert len(finished) == 3 and all(results_io.read_result(p) for p in finished)
    assert not list(config.results_dir.rglob("*.tmp"))
    monkeypatch.setattr(runner, "train_run", real_train_run)
    resumed = run_suite(config, log=lambda message: None)
    assert len(resumed.skipped) == 3 and not set(resumed.ran) & set(finished)


def test_control_runs_yellowfin_first_when_its_trace_is_missing(tmp_path, tiny_task_options):
    config = _config(tmp_path, tiny_task_options, tasks=["quadratic"], optimizers=["sgd_yf_step"], seeds=(3,))
    outcome = run_suite(config, log=lambda message: None)
    assert {p.name for p in outcome.ran} == {"yellowfin_seed3_steps4.json", "sgd_yf_step_seed3_steps4.json"}


def test_missing_data_skips_the_task_with_install_hint(tmp_path, tiny_task_options):
    options = {**tiny_task_options, "fmnist_resnet": {"data_dir": str(tmp_path / "nowhere")}}
    config = _config(tmp_path, options, tasks=["fmnist_resnet", "quadratic"], optimizers=["yellowfin"], seeds=(0,))
    messages = []
    outcome = run_suite(config, log=messages.append)
    assert "dataset-fashion-mnist" in outcome.missing_data["fmnist_resnet"]
    assert [p.name for p in outcome.ran] == ["yellowfin_seed0_steps4.json"]
    assert any("fmnist_resnet" in m for m in messages)


def test_quick_mode_uses_quick_budgets_and_options(tmp_path, tiny_task_options):
    config = _config(tmp_path, {}, tasks=["fmnist_resnet"], quick=True, steps=None)
    task = runner.build_task("fmnist_resnet", config)
    assert task.eval_examples == task.quick_options["eval_examples"]
    config = _config(tmp_path, {"fmnist_resnet": {"eval_examples": 7}}, quick=True)
    assert runner.build_task("fmnist_resnet", config).eval_examples == 7  # the user's options win


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_a_few_steps(name, monkeypatch):
    spec = OPTIMIZERS[name]
    if not spec.available():
        pytest.skip(spec.missing_message())
    schedule = [0.01] * 3 if spec.kind == "control" else None
    lr = 0.01 if spec.kind == "tuned" else None
    task = get_task("digits_mlp", hidden=8)
    evaluated = []
    real_evaluate = task.evaluate
    monkeypatch.setattr(task, "evaluate", lambda model, split: evaluated.append(model) or real_evaluate(model, split))
    record = train_run(task, spec, seed=0, steps=3, lr=lr, lr_schedule=schedule)
    assert record["completed_steps"] == 3
    # The recorded accuracy is the trained model's, counted again here by hand.
    model = evaluated[0]
    untrained = task.make_model(0)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), untrained.parameters()))
    inputs, labels = task.splits.val
    with torch.no_grad():
        correct = (model(inputs).argmax(dim=1) == labels).sum().item()
    assert record["eval"]["val"]["accuracy"] == correct / len(labels)


class _TwoPointSGD(torch.optim.SGD):
    """Plain SGD with Schedule-Free's train()/eval() interface, recording the calls."""

    def __init__(self, params, lr=None):
        super().__init__(params, lr=0.01)
        self.modes = []

    def train(self):
        self.modes.append("train")

    def eval(self):
        self.modes.append("eval")


@pytest.mark.parametrize("switch", [True, False])
def test_mode_switching_follows_the_spec_not_the_optimizer_methods(switch):
    from yellowfin.bench.optimizers import UNTUNED, OptimizerSpec

    built = []
    spec = OptimizerSpec("two_point", "two-point SGD", UNTUNED, lambda p, lr=None: built.append(_TwoPointSGD(p))
                         or built[-1], needs_mode_switch=switch)
    train_run(get_task("digits_mlp", hidden=8), spec, seed=0, steps=2)
    assert built[0].modes == (["train", "eval"] if switch else [])


def test_an_optimizer_with_averaging_is_evaluated_at_its_average(monkeypatch):
    spec = get_optimizer_spec("dog")
    if not spec.available():
        pytest.skip(spec.missing_message())
    task = get_task("quadratic")
    evaluated = []
    real_evaluate = task.evaluate
    monkeypatch.setattr(task, "evaluate", lambda model, split: evaluated.append(model) or real_evaluate(model, split))
    import dog

    made = []
    real = dog.PolynomialDecayAverager
    monkeypatch.setattr(dog, "PolynomialDecayAverager", lambda model: made.append(real(model)) or made[-1])
    record = train_run(task, spec, seed=0, steps=20)
    assert evaluated and all(model is made[0].averaged_model for model in evaluated)
    assert made[0].averaged_model is not made[0].base_model
    assert record["eval"]["test"]["excess_loss"] == pytest.approx(record["exact_loss"][-1])  # both at the average


def test_yellowfin_with_average_is_evaluated_at_the_average_it_keeps():
    from yellowfin.bench.variants import VARIANT_SPECS

    spec = VARIANT_SPECS["yf_scale_free_dog_average"]
    task = get_task("quadratic")
    plain = train_run(task, VARIANT_SPECS["yf_scale_free_dog"], seed=0, steps=200)
    averaged = train_run(task, spec, seed=0, steps=200)
    assert averaged["loss"] == plain["loss"]  # the same trajectory ...
    assert averaged["exact_loss"] != plain["exact_loss"]  # ... evaluated elsewhere: at the average
    assert averaged["exact_loss"][0] == plain["exact_loss"][0]  # (which starts at the first iterate)
    assert averaged["eval"]["test"]["excess_loss"] == pytest.approx(averaged["exact_loss"][-1])


def test_yellowfins_average_is_evaluated_with_refreshed_batchnorm_statistics(monkeypatch, tiny_task_options):
    # The averaged weights never saw the batch-norm statistics measured along the iterates: as for Schedule-Free,
    # the runner refreshes them on training batches before evaluating (docs/algorithm.md §10 tells users the same).
    task = get_task("fmnist_resnet8", **tiny_task_options["fmnist_resnet8"])
    refreshed, evaluated = [], []
    real_refresh, real_evaluate = runner.refresh_batchnorm, task.evaluate
    monkeypatch.setattr(runner, "refresh_batchnorm", lambda t, model, seed: refreshed.append(model)
                        or real_refresh(t, model, seed))
    monkeypatch.setattr(task, "evaluate", lambda model, split: evaluated.append(model) or real_evaluate(model, split))
    train_run(task, get_optimizer_spec("yellowfin"), seed=0, steps=3)
    assert len(refreshed) == 1 and evaluated and all(model is refreshed[0] for model in evaluated)
    running_means = [m.running_mean for m in refreshed[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert running_means and all(torch.isfinite(mean).all() for mean in running_means)
    refreshed.clear()
    train_run(task, get_optimizer_spec("adam"), seed=0, steps=3, lr=1e-3)  # (its iterate: nothing to refresh)
    assert refreshed == []
