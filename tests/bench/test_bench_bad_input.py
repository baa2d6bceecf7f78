"""Bad input to the command line (broken data files, unwritable directories, damaged results files, bad numbers)
is refused with one clear line on stderr and a non-zero exit, before any training, never with a traceback."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from yellowfin.bench import data, results as results_io, runner
from yellowfin.cli import EXIT_BAD_INPUT, main

from bench_fixtures import write_fake_fashion_mnist


@pytest.fixture
def train_calls(monkeypatch):
    """Every training run the suite starts, recorded (and still run)."""
    calls = []
    real = runner.train_run

    def spy(task, spec, *args, **kwargs):
        calls.append((task.name, spec.name))
        return real(task, spec, *args, **kwargs)

    monkeypatch.setattr(runner, "train_run", spy)
    return calls


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Broken Fashion-MNIST files


def _garbage_bytes(directory):
    (directory / "train-labels-idx1-ubyte").write_bytes(b"this is not an IDX file at all")
    return "train-labels-idx1-ubyte", "bad magic number"


def _gzipped(directory):
    for path in directory.glob("*-ubyte"):
        path.unlink()
    write_fake_fashion_mnist(directory, gz=True)


def _not_gzip(directory):
    _gzipped(directory)
    (directory / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes, not gzip")
    return "train-images-idx3-ubyte.gz", "not a valid gzip file"


def _gzip_cut_short(directory):
    _gzipped(directory)
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    return "t10k-images-idx3-ubyte.gz", "not a valid gzip file"


def _labels_out_of_range(directory):
    data.write_idx(directory / "train-labels-idx1-ubyte", np.full(96, 255, dtype=np.uint8))
    return "train-labels-idx1-ubyte", "labels outside 0..9"


def _images_wrong_size(directory):
    data.write_idx(directory / "t10k-images-idx3-ubyte", np.zeros((40, 32, 32), dtype=np.uint8))
    return "t10k-images-idx3-ubyte", "shape (N, 28, 28)"


def _images_flat(directory):
    data.write_idx(directory / "train-images-idx3-ubyte", np.zeros((96, 784), dtype=np.uint8))
    return "train-images-idx3-ubyte", "shape (N, 28, 28)"


def _fewer_labels_than_images(directory):
    data.write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(39, dtype=np.uint8))
    return "t10k-labels-idx1-ubyte", "39 labels for the 40 images"


def _header_cut_short(directory):
    (directory / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    return "train-images-idx3-ubyte", "truncated IDX header"


def _float_labels(directory):
    data.write_idx(directory / "train-labels-idx1-ubyte", np.zeros(96, dtype=np.float32))
    return "train-labels-idx1-ubyte", "integer labels"


BROKEN_DATA = [_garbage_bytes, _not_gzip, _gzip_cut_short, _labels_out_of_range, _images_wrong_size, _images_flat,
               _fewer_labels_than_images, _header_cut_short, _float_labels]


@pytest.mark.parametrize("breakage", BROKEN_DATA, ids=lambda f: f.__name__.strip("_"))
def test_bench_refuses_broken_fashion_mnist_before_any_training(tmp_path, capsys, train_calls, breakage):
    directory = write_fake_fashion_mnist(tmp_path / "fm", gz=False)
    name, problem = breakage(directory)
    results = tmp_path / "results"
    # quadratic comes first: before the fix it trained, then the suite crashed on the Fashion-MNIST files.
    argv = ["bench", "quadratic", "fmnist_resnet", "--optimizers", "yellowfin", "--steps", "2", "--seeds", "0",
            "--data-dir", str(directory), "--results", str(results), "--no-progress"]
    assert main(argv) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("yellowfin bench: error: ")
    assert str(directory / name) in line and problem in line
    assert train_calls == [] and not results.exists()


def test_demo_refuses_broken_fashion_mnist_instead_of_falling_back(tmp_path, capsys):
    directory = write_fake_fashion_mnist(tmp_path / "fm", gz=False)
    name, problem = _labels_out_of_range(directory)
    out_dir = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--data-dir", str(directory), "--out", str(out_dir), "--no-progress"]
    assert main(argv) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert str(directory / name) in line and problem in line
    assert "Task:" not in captured.out and list(out_dir.iterdir()) == []


def test_broken_data_gives_one_line_through_the_real_entry_point(tmp_path):
    directory = write_fake_fashion_mnist(tmp_path / "fm", gz=True)
    name, _ = _not_gzip(directory)
    done = subprocess.run([sys.executable, "-m", "yellowfin", "bench", "fmnist_resnet", "--optimizers", "yellowfin",
                           "--steps", "1", "--seeds", "0", "--data-dir", str(directory),
                           "--results", str(tmp_path / "results"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_BAD_INPUT
    assert str(directory / name) in _one_error_line(done.stderr)


def test_read_idx_names_the_file_for_gzip_and_read_errors(tmp_path):
    bad = tmp_path / "labels.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(data.DataInvalidError, match=f"{bad}: not a valid gzip file"):
        data.read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes(1000))
    short.write_bytes(short.read_bytes()[:-12])  # the compressed stream loses its end
    with pytest.raises(ValueError, match="short.gz: not a valid gzip file"):
        data.read_idx(short)
    with pytest.raises(data.DataInvalidError, match="cannot be read"):
        data.read_idx(tmp_path)  # a directory


def test_read_idx_huge_declared_shape_is_truncation_not_overflow(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 0x08, 4]) + b"\xff\xff\xff\xff" * 4 + bytes(16))
    with pytest.raises(data.DataInvalidError, match="truncated IDX file"):
        data.read_idx(path)


def test_bench_refuses_a_text_too_short_for_the_language_model(tmp_path, capsys, train_calls):
    text = tmp_path / "short.txt"
    text.write_text("In the beginning. " * 20, encoding="utf-8")  # 360 characters: 18 per held-out split
    argv = ["bench", "quadratic", "char_lstm", "--optimizers", "yellowfin", "--steps", "2", "--seeds", "0",
            "--text-path", str(text), "--results", str(tmp_path / "results"), "--no-progress"]
    assert main(argv) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert str(text) in line and "too short for seq_len 64" in line
    assert train_calls == []


# ---------------------------------------------------------------------------------------------------------------
# Directories that cannot be written


def test_bench_refuses_a_results_directory_that_cannot_be_created(tmp_path, capsys, train_calls):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["bench", "quadratic", "--optimizers", "yellowfin", "--steps", "2", "--seeds", "0",
            "--results", str(blocker / "results"), "--no-progress"]
    assert main(argv) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"yellowfin bench: error: cannot write to {blocker / 'results'}: Not a directory"
    assert train_calls == []


def test_bench_refuses_a_task_directory_that_is_a_file(tmp_path, capsys, train_calls):
    results = tmp_path / "results"
    results.mkdir()
    (results / "quadratic").write_text("")
    argv = ["bench", "quadratic", "--optimizers", "yellowfin", "--steps", "2", "--seeds", "0",
            "--results", str(results), "--no-progress"]
    assert main(argv) == EXIT_BAD_INPUT
    assert "is a file, not a directory" in _one_error_line(capsys.readouterr().err)
    assert train_calls == []


def test_bench_refuses_a_read_only_results_directory(tmp_path, capsys, train_calls):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    try:
        if os.access(results, os.W_OK):
            pytest.skip("this user (root) writes into read-only directories anyway")
        argv = ["bench", "quadratic", "--optimizers", "yellowfin", "--steps", "2", "--seeds", "0",
                "--results", str(results), "--no-progress"]
        assert main(argv) == EXIT_BAD_INPUT
        assert f"cannot write to {results}" in _one_error_line(capsys.readouterr().err)
        assert train_calls == []
    finally:
        results.chmod(0o755)


def test_a_finished_suite_resumes_without_writing(tmp_path, capsys, monkeypatch):
    """The write check waits for the first run that must train: rerunning a complete suite writes nothing."""
    results = tmp_path / "results"
    argv = ["bench", "quadratic", "--optimizers", "yellowfin", "--steps", "2", "--seeds", "0",
            "--results", str(results), "--no-progress"]
    assert main(argv) == 0
    checked = []
    monkeypatch.setattr(results_io, "check_writable", lambda *args: checked.append(args))
    assert main(argv) == 0
    assert "0 runs done, 1 already there" in capsys.readouterr().out and checked == []


def test_demo_refuses_an_output_directory_before_training(tmp_path, capsys, monkeypatch):
    from yellowfin.bench import demo

    monkeypatch.setattr(demo, "choose_task", lambda *args: pytest.fail("got as far as loading data"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo", "--steps", "2", "--out", str(blocker), "--no-progress"]) == EXIT_BAD_INPUT
    assert "is a file, not a directory" in _one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def good_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("good") / "results"
    assert main(["bench", "quadratic", "--optimizers", "yellowfin", "sgd_yf_step", "--steps", "3", "--seeds", "0",
                 "--results", str(results), "--no-progress"]) == 0
    return results


@pytest.mark.parametrize("where, message", [
    (lambda tmp, good: ["--results", str(tmp / "typo")], "results directory {tmp}/typo does not exist"),
    (lambda tmp, good: ["--results", str(good), "--out", str(tmp)], "cannot write the report to {tmp}"),
    (lambda tmp, good: ["--results", str(good), "--out", str(tmp / "a-file" / "b.md")], "cannot write to {tmp}/a-file"),
    (lambda tmp, good: ["--results", str(good), "--figures", str(tmp / "a-file")], "cannot write to {tmp}/a-file"),
], ids=["missing-results", "out-is-a-directory", "out-under-a-file", "figures-is-a-file"])
def test_report_refuses_bad_paths(tmp_path, capsys, good_results, where, message):
    (tmp_path / "a-file").write_text("")
    argv = ["report", "--out", str(tmp_path / "b.md"), "--figures", str(tmp_path / "figures"), "--no-robustness"]
    assert main(argv + where(tmp_path, good_results)) == EXIT_BAD_INPUT
    assert message.format(tmp=tmp_path) in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "figures").exists()


# ---------------------------------------------------------------------------------------------------------------
# Damaged results files


def test_report_skips_damaged_results_files_and_says_why(tmp_path, capsys, good_results):
    results = tmp_path / "results"
    (results / "quadratic").mkdir(parents=True)
    for path in good_results.glob("*/*.json"):
        (results / "quadratic" / path.name).write_bytes(path.read_bytes())
    good = json.loads((results / "quadratic" / "yellowfin_seed0_steps3.json").read_text())
    damaged = {
        "wrong_fields.json": json.dumps({"schema": 1, "task": "quadratic", "steps": "3"}),
        "wrong_type.json": json.dumps({**good, "task": "quadratic"}),
        "truncated.json": json.dumps(good)[:150],
        "a_list.json": "[1, 2]",
        "old_schema.json": json.dumps({**good, "schema": 0}),
    }
    for name, text in damaged.items():
        (results / "quadratic" / name).write_text(text)
    markdown = tmp_path / "benchmarks.md"
    argv = ["report", "--results", str(results), "--out", str(markdown), "--figures", str(tmp_path / "figures"),
            "--no-robustness"]
    assert main(argv) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == len(damaged) and "Traceback" not in "".join(warnings)
    reasons = {
        "wrong_fields.json": "missing fields higher_is_better, optimizer",
        "wrong_type.json": "field task must be an object",
        "truncated.json": "not valid JSON (truncated?)",
        "a_list.json": "not a JSON object but list",
        "old_schema.json": "schema 0, expected 1",
    }
    for name, reason in reasons.items():
        line = next(w for w in warnings if name in w)
        assert line.startswith(f"warning: skipped {results / 'quadratic' / name}: {reason}")
    text = markdown.read_text()
    assert "#### quadratic (3 steps)" in text and "YellowFin (defaults)" in text  # the good runs still reported


@pytest.mark.parametrize("change, reason", [
    ({"loss": [1.0, "x", 2.0]}, "field loss must be a list of numbers"),
    ({"seed": 1.5}, "field seed must be an integer"),
    ({"steps": 0}, "field steps must be a positive integer"),
    ({"kind": "magic"}, "field kind must be one of"),
    ({"kind": "tuned", "lr": None}, "a tuned run without its learning rate"),
    ({"eval": {"test": {"loss": "low"}}}, "field eval must be"),
    ({"trace": {"mu": [0.5, None, "?"]}}, "field trace must be"),
    ({"completed_steps": 2}, "3 losses for completed_steps 2"),
    ({"diverged": "no"}, "field diverged must be true or false"),
    ({"trace": {"mu": [0.0, 0.1, 0.2]}}, "a YellowFin run without its trace of effective_lr"),
])
def test_record_problem_names_the_bad_field(good_results, change, reason):
    record = results_io.load_result(good_results / "quadratic" / "yellowfin_seed0_steps3.json")
    assert results_io.record_problem(record) is None
    assert results_io.record_problem({**record, **change}).startswith(reason)


def test_bench_runs_again_over_a_damaged_results_file(tmp_path, train_calls):
    results = tmp_path / "results"
    path = results_io.run_path(results, "quadratic", "yellowfin", 0, 2)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": 1, "task": {"name": "quadratic"}}))
    said = []
    config = runner.SuiteConfig(tasks=["quadratic"], optimizers=["yellowfin"], seeds=(0,), steps=2,
                                results_dir=results, progress=False)
    outcome = runner.run_suite(config, log=said.append)
    assert outcome.ran == [path] and train_calls == [("quadratic", "yellowfin")]
    assert results_io.load_result(path)["completed_steps"] == 2
    assert any(str(path) in message and "missing fields" in message for message in said)


# ---------------------------------------------------------------------------------------------------------------
# Bad names and numbers on the command line


@pytest.mark.parametrize("argv, message", [
    (["bench", "quadratic", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["bench", "quadratic", "--steps", "-3"], "argument --steps: expected a positive integer, got -3"),
    (["bench", "quadratic", "--steps", "many"], "argument --steps: expected a positive integer, got 'many'"),
    (["bench", "quadratic", "--threads", "0"], "argument --threads: expected a positive integer"),
    (["bench", "quadratic", "--seeds", "0", "-1"], "argument --seeds: a seed must be an integer from 0 to"),
    (["bench", "quadratic", "--seeds", str(2**64)], "argument --seeds: a seed must be an integer from 0 to"),
    (["demo", "--minutes", "-1"], "argument --minutes: minutes must be a positive finite number, got -1"),
    (["demo", "--minutes", "nan"], "argument --minutes: minutes must be a positive finite number, got nan"),
    (["demo", "--minutes", "inf"], "argument --minutes: minutes must be a positive finite number, got inf"),
    (["demo", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["demo", "--threads", "-2"], "argument --threads: expected a positive integer, got -2"),
    (["demo", "--seed", "x"], "argument --seed: expected an integer seed, got 'x'"),
])
def test_bad_numbers_are_refused_with_what_is_allowed(tmp_path, monkeypatch, capsys, train_calls, argv, message):
    monkeypatch.chdir(tmp_path)  # were a number let through, its default results would land here
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--no-progress"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert train_calls == []


@pytest.mark.parametrize("argv, message", [
    (["bench", "mnist_cnn"], "unknown task mnist_cnn; choose from quadratic, digits_mlp, fmnist_resnet, char_lstm, "
                             "logreg, autoencoder, fmnist_resnet8"),
    (["bench", "quadratic", "--optimizers", "adam", "lion", "sophia"], "unknown optimizers lion, sophia; choose from "
                                                                       "yellowfin, yellowfin_reference, sgd_momentum, adam"),
])
def test_unknown_names_list_the_known_ones(tmp_path, monkeypatch, capsys, train_calls, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--no-progress"]) == EXIT_BAD_INPUT
    assert message in _one_error_line(capsys.readouterr().err)
    assert train_calls == []
