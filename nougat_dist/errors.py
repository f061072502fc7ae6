"""Errors that end a job with a message for the user (exit 2), shared by every stage."""

from __future__ import annotations


class SetupError(RuntimeError):
    """The job cannot start; raised on every rank with the same message."""

