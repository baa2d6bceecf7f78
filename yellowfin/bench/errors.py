"""Errors caused by what the user gave (data files, directories, results files), as opposed to bugs. The command
line prints their message as one line and exits non-zero instead of showing a traceback."""

from __future__ import annotations


class BadInputError(Exception):
    """Something the user supplied cannot be used; the message names it and says what is wrong."""


class DataInvalidError(BadInputError, ValueError):
    """A data file exists but is not usable (wrong format, shape, labels); the message names the file."""


class NotWritableError(BadInputError, OSError):
    """A directory that output must go to cannot be created or written."""
