import json
import subprocess
import sys

from yellowfin.cli import main


def test_python_dash_m_yellowfin_help():
    done = subprocess.run([sys.executable, "-m", "yellowfin", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("demo", "bench", "report"):
        assert command in done.stdout


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "fmnist_resnet" in out and "sgd_yf_step" in out


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "mnist_cnn", "--no-progress"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_bench_then_report(tmp_path, capsys, text_path):
    results = tmp_path / "results"
    argv = ["bench", "quadratic", "char_lstm", "--optimizers", "yellowfin", "adam", "sgd_yf_step",
            "--seeds", "0", "--steps", "3", "--results", str(results), "--text-path", str(text_path),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    files = sorted(results.rglob("*.json"))
    n_adam_grid = 6 + 5  # quadratic and char_lstm grids
    assert len(files) == 2 * 2 + n_adam_grid
    assert f"{len(files)} runs done" in out
    record = json.loads((results / "char_lstm" / "yellowfin_seed0_steps3.json").read_text())
    assert record["task"]["text_path"] == str(text_path) and record["steps"] == 3
    assert "--steps 3" in record["command"]

    assert main(argv) == 0  # resumes: nothing left to do
    assert f"0 runs done, {len(files)} already there" in capsys.readouterr().out

    markdown = tmp_path / "benchmarks.md"
    assert main(["report", "--results", str(results), "--out", str(markdown), "--figures",
                 str(tmp_path / "figures"), "--no-robustness"]) == 0
    text = markdown.read_text()
    assert "#### char_lstm (3 steps)" in text and "test perplexity" in text
    assert (tmp_path / "figures" / "results-char_lstm-3-loss.png").is_file()


def test_bench_reports_missing_data_with_exit_code(tmp_path, capsys):
    argv = ["bench", "fmnist_resnet", "--optimizers", "yellowfin", "--steps", "2", "--seeds", "0",
            "--data-dir", str(tmp_path / "nothing"), "--results", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_demo_on_generated_fashion_mnist(tmp_path, capsys, fmnist_dir):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--data-dir", str(fmnist_dir), "--out", str(out_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "YellowFin (defaults)" in out and "Adam" in out
    assert f"Figure (loss curves, tuned mu and alpha): {out_dir / 'demo.png'}" in out
    assert (out_dir / "demo.png").stat().st_size > 1000
    summary = json.loads((out_dir / "demo.json").read_text())
    assert not summary["fallback"] and [len(r["loss"]) for r in summary["runs"]] == [3, 3]
    assert len(summary["runs"][0]["mu"]) == 3 and summary["runs"][1]["mu"] == []


def test_demo_falls_back_to_digits_and_says_why(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--data-dir", str(tmp_path / "nothing"), "--out", str(out_dir), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "apt-get install dataset-fashion-mnist" in out and "digits" in out
    assert json.loads((out_dir / "demo.json").read_text())["fallback"] is True


def test_data_dir_reaches_every_fashion_mnist_task(tmp_path, capsys, fmnist_dir):
    results = tmp_path / "results"
    argv = ["bench", "logreg", "autoencoder", "fmnist_resnet8", "--optimizers", "yellowfin", "--steps", "2",
            "--seeds", "0", "--data-dir", str(fmnist_dir), "--results", str(results), "--no-progress"]
    assert main(argv) == 0
    for task in ("logreg", "autoencoder", "fmnist_resnet8"):
        record = json.loads((results / task / "yellowfin_seed0_steps2.json").read_text())
        assert record["task"]["data_dir"] == str(fmnist_dir) and record["completed_steps"] == 2


def test_demo_evaluates_yellowfins_average_with_its_own_batchnorm_statistics(tiny_task_options):
    # A copy of the average, its statistics measured again (docs/algorithm.md §10); the trained model is left as it was.
    import copy

    import torch

    from yellowfin import YellowFin
    from yellowfin.bench.demo import DemoRun, _evaluate_handed_out
    from yellowfin.bench.runner import refresh_batchnorm
    from yellowfin.bench.tasks import get_task

    task = get_task("fmnist_resnet8", **tiny_task_options["fmnist_resnet8"])
    model = task.make_model(0)
    opt = YellowFin(model.parameters())
    batches = task.train_batches(0)
    for _ in range(3):
        opt.zero_grad()
        task.loss(model, next(batches)).backward()
        opt.step()
    before = copy.deepcopy(model.state_dict())
    measured = _evaluate_handed_out(task, DemoRun("YellowFin", opt, model, losses=[1.0]), seed=0)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    with opt.averaged():
        expected = copy.deepcopy(model)
    refresh_batchnorm(task, expected, 0)
    assert measured == task.evaluate(expected, "test")
    assert measured != task.evaluate(model, "test")
