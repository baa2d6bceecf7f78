"""Files and checkpoints that survive a crash: atomic writes (benchmark results, checkpoints), checkpoint
loads that cannot run code, and restores that apply a checkpoint whole or not at all. Every file the
package writes goes through :func:`atomic_write`."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Callable, IO

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], text: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s directory, flush it to disk, then rename it
    over ``path``: a crash or Ctrl-C at any moment leaves either the old file or the new one, never half
    of one, and no temporary file behind when it raises. ``text`` opens the file in text mode (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint_file(state: dict, path: str | os.PathLike) -> str:
    """``torch.save`` through :func:`atomic_write`; returns ``path`` as a string."""
    atomic_write(path, lambda f: torch.save(state, f))
    return str(path)


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """``torch.load`` that can only rebuild tensors and plain containers: a checkpoint file can never run
    code (with ``weights_only=False`` unpickling a crafted file runs whatever it names)."""
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint (a dict)")
    return state


def load_all_or_nothing(loads: list[tuple[object, dict]]) -> None:
    """``component.load_state_dict(state)`` for each pair; if any of them raises, every component gets its
    previous state back before the error propagates, so a checkpoint that fails to load changes nothing
    (``load_state_dict`` methods check as they go and may have applied part of the state already)."""
    previous = [(component, copy.deepcopy(component.state_dict())) for component, _ in loads]
    try:
        for component, state in loads:
            component.load_state_dict(state)
    except BaseException:
        for component, state in previous:
            component.load_state_dict(state)
        raise
