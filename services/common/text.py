"""Text a person typed (a title, a description), made safe to store and show anywhere.

    one_line("Whiskers\\non the beach\\x07")         # "Whiskers on the beach"
    paragraphs("Line one\\r\\n\\r\\n\\r\\n\\tLine two  ")   # "Line one\\n\\nLine two"

Control characters go (a title's line breaks and tabs become spaces; a description keeps its line
breaks), and so do the bidirectional controls that reorder how the rest of a line is displayed
(a filename or title could otherwise show as something else than it is). Both trim; the caller
checks the length that is left and picks a default for an empty result.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = ["MAX_DESCRIPTION_CHARS", "MAX_TITLE_CHARS", "one_line", "paragraphs"]

MAX_TITLE_CHARS: Final = 200
MAX_DESCRIPTION_CHARS: Final = 5000

# Bidirectional embeddings, overrides and isolates: they reorder how the rest of a line is displayed.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SPACES = re.compile(r"\s+")
_LINE_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def one_line(raw: str) -> str:
    """`raw` as one line: every run of whitespace one space, control characters removed, trimmed."""
    return _SPACES.sub(" ", _printable(raw, keep="")).strip()


def paragraphs(raw: str) -> str:
    """`raw` with its line breaks (any convention, as `\\n`; at most one blank line in a row), spaces within a
    line collapsed, other control characters removed, each line and the whole trimmed."""
    text = _printable(raw.replace("\r\n", "\n").replace("\r", "\n"), keep="\n")
    lines = [_LINE_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _printable(raw: str, *, keep: str) -> str:
    kept = []
    for char in raw:
        if char in keep:
            kept.append(char)
        elif char.isspace():
            kept.append(" ")
        elif unicodedata.category(char) not in ("Cc", "Cs") and char not in _BIDI_CONTROLS:
            kept.append(char)
    return "".join(kept)
