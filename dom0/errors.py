"""Errors that the CLI turns into one line and a documented exit code.

Why a single base class: every command ends in ``cli.main``, which prints
``supercharge: <message>`` for a :class:`UserError` and exits with its code,
so no traceback ever reaches an admin for bad input or a missing tool.
"""
from __future__ import annotations

# Exit codes, documented in docs/cli.md.
EXIT_OK = 0
EXIT_FAILED = 1       # the operation ran and its outcome is a failure (boot failed, hunk did not fit)
EXIT_BAD_INPUT = 2    # bad arguments, invalid plan/config, missing file or kernel
EXIT_ENVIRONMENT = 3  # a required tool or package is missing, or an external command failed
EXIT_TIMEOUT = 4      # a guest did not finish in time


class UserError(Exception):
    """An error caused by input or environment, reported as one line."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class EnvironmentProblem(UserError):
    """A tool or package the command needs is missing or failed."""

    exit_code = EXIT_ENVIRONMENT
