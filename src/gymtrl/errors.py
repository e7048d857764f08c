"""User-facing errors.

Anything a user can fix (a config key, a data row, a server that is not up) is raised as a
`GymtrlError`. The CLI prints it as one line (plus an optional hint) and exits non-zero; the
traceback is shown only with `--debug`. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class GymtrlError(Exception):
    """An error the user can act on. `hint` says what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(GymtrlError):
    """The config file or a command-line override is wrong."""


class DataError(GymtrlError):
    """A dataset file or row is wrong (the message names file and line)."""


class ServerError(GymtrlError):
    """A server could not be started, reached or kept alive."""

    exit_code = 3


class RolloutFailureBoundError(GymtrlError):
    """Too many rollouts failed: the run stops rather than train on what is left."""

    exit_code = 4


class WeightSyncError(GymtrlError):
    """The inference server did not take the trainer's weights."""

    exit_code = 5


class StoppedBySignal(GymtrlError):
    """SIGTERM/SIGINT (preemption, Ctrl-C): the run saved a checkpoint and stopped."""

    exit_code = 143
