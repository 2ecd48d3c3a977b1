"""Internal locations kept out of what clients read: bucket URIs and server paths inside free text.

    redact("could not read file:///srv/cattube/bucket/videos/v1/master.mp4", "/srv/cattube")
    # "could not read <bucket object>"

Reasons and errors travel between services with their URIs (the consumer needs them); a record a
person reads shows what went wrong, never where the server keeps its files.
"""

from __future__ import annotations

import re

__all__ = ["redact"]

HIDDEN = "<bucket object>"
_URIS = re.compile(r"\b(?:file|s3)://[^\s'\"<>)\]]*")


def redact(text: str, *roots: str) -> str:
    """`text` with every file:// and s3:// URI, and every path under one of `roots`, replaced by a mark."""
    text = _URIS.sub(HIDDEN, text)
    for root in sorted({r.rstrip("/") for r in roots if r.strip("/")}, key=len, reverse=True):
        text = re.sub(re.escape(root) + r"(?:/[^\s'\"<>)\]]*)?", HIDDEN, text)
    return text
