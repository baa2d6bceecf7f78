"""Errors caused by what the user gave (data files, directories, results files), as opposed to bugs. The command
line prints their message as one line and exits non-zero instead of showing a traceback."""

from __future__ import annotations

from pathlib import Path


class BadInputError(Exception):
    """Something the user supplied cannot be used; the message names it and says what is wrong."""


class DataInvalidError(BadInputError, ValueError):
    """A data file exists but is not usable (wrong format, shape, labels); the message names the file."""


class NotWritableError(BadInputError, OSError):
    """A directory that output must go to cannot be created or written."""


class InvalidResultError(BadInputError, ValueError):
    """A results file that cannot be used (truncated, wrong fields); str() names the file and says why. The suite
    runs such a run again; the report leaves the file out with a warning."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason
