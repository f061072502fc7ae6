"""Errors that end a command with a message for the user (exit 2), shared by every stage."""

from __future__ import annotations


class SetupError(RuntimeError):
    """The job cannot start; raised on every rank with the same message."""


class UsageError(ValueError):
    """Bad input to a command (a flag value out of range, an output dir not ready for this stage).

    The command prints the message on one line and exits 2; any other exception keeps its
    traceback, since it is a bug or a failure the message alone would not explain."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or directory the command reads is not there (yet); the message says what makes it."""
