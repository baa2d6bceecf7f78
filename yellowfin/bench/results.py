"""Results files: one JSON file per run, where it lives, how it is written and read back, and the learning-rate
choice for tuned baselines. Writing is atomic (temporary file, then rename), so an interrupted suite leaves only
complete files behind and a rerun skips them."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from yellowfin.bench.errors import InvalidResultError, NotWritableError
from yellowfin.bench.optimizers import CONTROL, TUNED, UNTUNED, find_optimizer_spec
from yellowfin.files import atomic_write

SCHEMA_VERSION = 1
DEFAULT_RESULTS_DIR = Path("benchmarks") / "results"
QUICK_RESULTS_DIR = Path("benchmarks") / "results-quick"


def run_filename(optimizer: str, seed: int, steps: int, lr: float | None = None) -> str:
    lr_part = f"_lr{lr:g}" if lr is not None else ""
    return f"{optimizer}{lr_part}_seed{seed}_steps{steps}.json"


def run_path(results_dir: str | os.PathLike, task: str, optimizer: str, seed: int, steps: int,
             lr: float | None = None) -> Path:
    return Path(results_dir) / task / run_filename(optimizer, seed, steps, lr)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; a diverged loss is stored as null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def recorded_setting(value: Any) -> Any:
    """A hyperparameter as a results file can hold it: JSON has no infinity, so a setting such as
    ``relative_clip=math.inf`` (no clipping) is written as the string "inf" (``float("inf")`` reads it back)."""
    if isinstance(value, dict):
        return {key: recorded_setting(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [recorded_setting(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def check_writable(directory: str | os.PathLike, subdirectories: Iterable[str] = ()) -> Path:
    """Create directory (and its parents) when missing and prove that files can be written in it and in the
    subdirectories named (those that exist already; the others will be created in it). Raises NotWritableError,
    naming the directory and why, so that a command fails before its work rather than after."""
    directory = Path(directory)
    for target in [directory, *(directory / name for name in subdirectories)]:
        if target != directory and not target.exists():
            continue
        if target.exists() and not target.is_dir():
            raise NotWritableError(f"cannot write to {target}: it is a file, not a directory")
        try:
            target.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=target)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise NotWritableError(f"cannot write to {target}: {exc.strerror or exc}") from None
    return directory


def write_result(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write atomically: a Ctrl-C mid-write leaves either the old file or no file, never half a file."""
    return atomic_write(path, lambda f: json.dump({"schema": SCHEMA_VERSION, **record}, f, separators=(",", ":"),
                                                  allow_nan=False), text=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_curve(value: Any) -> bool:
    """A per-step series: numbers, with null where a step diverged."""
    return isinstance(value, list) and all(v is None or _is_number(v) for v in value)


def _is_evaluation(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(metrics, dict) and all(v is None or _is_number(v) for v in metrics.values())
        for metrics in value.values())


# What the runner writes and the report and the runner's resume read back: field -> (check, what it must be).
_REQUIRED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (lambda v: isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("metric"), str),
             "an object with string fields name and metric"),
    "higher_is_better": (lambda v: isinstance(v, bool), "true or false"),
    "optimizer": (lambda v: isinstance(v, str) and v != "", "an optimizer name"),
    "kind": (lambda v: v in (UNTUNED, TUNED, CONTROL), f"one of {UNTUNED!r}, {TUNED!r}, {CONTROL!r}"),
    "lr": (lambda v: v is None or _is_number(v), "a number or null"),
    "seed": (_is_int, "an integer"),
    "steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "completed_steps": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "diverged": (lambda v: isinstance(v, bool), "true or false"),
    "loss": (_is_curve, "a list of numbers (null where diverged)"),
    "wall": (lambda v: isinstance(v, list) and all(_is_number(t) for t in v), "a list of numbers"),
    "eval": (_is_evaluation, "an object of splits, each an object of numbers"),
    "train_seconds": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "environment": (lambda v: isinstance(v, dict), "an object"),
}
_OPTIONAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer_label": (lambda v: isinstance(v, str), "a string"),
    "command": (lambda v: isinstance(v, str), "a string"),
    "exact_loss": (_is_curve, "a list of numbers (null where diverged)"),
    "trace": (lambda v: isinstance(v, dict) and all(_is_curve(c) for c in v.values()),
              "an object of lists of numbers"),
}


def record_problem(record: Any) -> str | None:
    """Why a decoded results file cannot be used (one line), or None when it has every field the runner writes,
    each of the right type."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    if record.get("schema") != SCHEMA_VERSION:
        return f"schema {record.get('schema')!r}, expected {SCHEMA_VERSION}"
    missing = [name for name in _REQUIRED_FIELDS if name not in record]
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    for fields, optional in ((_REQUIRED_FIELDS, False), (_OPTIONAL_FIELDS, True)):
        for name, (valid, expected) in fields.items():
            if optional and name not in record:
                continue
            if not valid(record[name]):
                return f"field {name} must be {expected}, found {json.dumps(record[name])[:60]}"
    if record["kind"] == TUNED and record["lr"] is None:
        return "a tuned run without its learning rate (lr is null)"
    spec = find_optimizer_spec(record["optimizer"])
    if spec is not None and spec.records_tuner_trace and not (record.get("trace") or {}).get("effective_lr"):
        return "a YellowFin run without its trace of effective_lr (the control run replays it)"
    if len(record["loss"]) != record["completed_steps"]:
        return f"{len(record['loss'])} losses for completed_steps {record['completed_steps']}"
    return None


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """The record in a results file. Raises FileNotFoundError when there is none, InvalidResultError (saying
    why) when it is unreadable, truncated, from another schema or lacks a field the runner writes."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise
    except NotADirectoryError:  # a parent is a file: there is no such results file either
        raise FileNotFoundError(f"no results file {path}") from None
    except OSError as exc:
        raise InvalidResultError(path, f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: typically a file cut short
        raise InvalidResultError(path, f"not valid JSON (truncated?): {exc}") from None
    problem = record_problem(record)
    if problem is not None:
        raise InvalidResultError(path, problem)
    return record


def read_result(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record in a results file, or None when the file is missing or not a valid record (see load_result)."""
    try:
        return load_result(path)
    except (FileNotFoundError, InvalidResultError):
        return None


def scan_results(results_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[InvalidResultError]]:
    """Every valid run under results_dir (any task), sorted by path, and what was wrong with each other file."""
    records, invalid = [], []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        try:
            record = load_result(path)
        except InvalidResultError as exc:
            invalid.append(exc)
            continue
        except FileNotFoundError:  # removed since the listing
            continue
        record["path"] = str(path)
        records.append(record)
    return records, invalid


def load_results(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every valid run under results_dir (any task), sorted by path; invalid files are left out (scan_results
    says which and why)."""
    return scan_results(results_dir)[0]


def val_score(record: dict[str, Any]) -> float:
    """Lower is better. The task's metric on the validation split (negated when higher is better); a diverged
    run scores infinity so it is never chosen."""
    if record.get("diverged"):
        return math.inf
    val = (record.get("eval") or {}).get("val") or {}
    metric = record["task"]["metric"]
    value = val.get(metric)
    if value is None or not math.isfinite(value):
        return math.inf
    return -value if record.get("higher_is_better") else value


def best_lr(grid_records: Iterable[dict[str, Any]]) -> float | None:
    """The learning rate whose grid run scored best on the validation split (ties: lower val loss, then the
    smaller learning rate). None when every run diverged."""
    candidates = [r for r in grid_records if math.isfinite(val_score(r))]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: (val_score(r), r["eval"]["val"].get("loss", math.inf), r["lr"]))
    return best["lr"]
