"""How the `cattube` command fails: one or two lines for a person, never a traceback."""

from __future__ import annotations


class Failure(Exception):
    """What went wrong and, where there is one, what to do about it; `cattube` prints it on stderr
    and exits with status 1."""
