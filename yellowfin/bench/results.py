"""Results files: one JSON file per run, where it lives, how it is written and read back, and the learning-rate
choice for tuned baselines. Writing is atomic (temporary file, then rename), so an interrupted suite leaves only
complete files behind and a rerun skips them."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

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


def write_result(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write atomically: a Ctrl-C mid-write leaves either the old file or no file, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"schema": SCHEMA_VERSION, **record}, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_result(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record in a results file, or None when the file is missing, unreadable or from another schema."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("schema") == SCHEMA_VERSION else None


def load_results(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete run under results_dir (any task), sorted by path."""
    records = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        record = read_result(path)
        if record is not None:
            record["path"] = str(path)
            records.append(record)
    return records


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
