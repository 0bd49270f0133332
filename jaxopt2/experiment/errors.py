"""Errors the command line reports in a few lines, without a traceback."""

from __future__ import annotations

__all__ = ["ConfigError", "DataFileError", "NonFiniteError", "UserError"]


class UserError(Exception):
    """A problem with what the user asked for (config, arguments, files); not a bug.

    The CLI prints the message (at most three lines) and exits with ``exit_code``.
    """

    exit_code = 2


class ConfigError(UserError):
    """An invalid config: unknown key, wrong type, unknown name, bad override."""


class DataFileError(UserError):
    """A task's data file is missing or malformed (the message names the file)."""


class NonFiniteError(UserError):
    """Training met a non-finite loss or update under ``nonfinite: stop``."""

    exit_code = 3
