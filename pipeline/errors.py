"""The one exception type users see as a one-line error (the CLI prints it and exits non-zero)."""

from __future__ import annotations


class KDError(Exception):
    """A problem with the user's input or files: the message says what is wrong and what to do."""
