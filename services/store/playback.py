"""HTTP range and conditional requests over a blob's facts (RFC 9110 §13, §14): pure functions, no I/O.

    byte_range = parse_range(request.headers.get("range"), info.size_bytes)   # None: the whole object
    etag = etag_of(info)
    if not_modified(request.headers, etag, info.modified_at): ...            # 304

Several ranges in one request (`bytes=0-1,5-6`) are answered with the whole object (200), which
RFC 9110 allows; players ask for one range at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

from services.common.blobs import BlobInfo

CONTENT_TYPES = {
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "webm": "video/webm",
    "mov": "video/quicktime",
    "mkv": "video/x-matroska",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "m3u8": "application/vnd.apple.mpegurl",  # RFC 8216 §4
    "m4s": "video/iso.segment",  # an ISO BMFF media segment (IANA), what CMAF's .m4s segments are
}


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int
    """Exclusive, like a slice."""

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


class RangeNotSatisfiable(Exception):
    """416: the range is malformed, or starts past the end."""


# A position has at most this many digits (10^18 bytes is past any object); a longer one is still
# well-formed (RFC 9110 puts no bound on it), so it is read as "further than the end" without converting it.
MAX_POSITION_DIGITS = 18
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range asked for: `bytes=0-99`, `bytes=100-`, `bytes=-500` (the last 500).

    Positions are ASCII digits only (`\u00b2` is a digit to Python, not to HTTP); one too long to
    matter is taken as beyond the end rather than converted.
    """
    if header is None:
        return None
    unit, equals, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not equals:
        return None  # another unit: ignore the header (RFC 9110 §14.2)
    if "," in spec:
        return None
    match = _RANGE_SPEC.fullmatch(spec.strip(" \t"))
    if match is None or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiable(f"expected bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX, got {header[:80]!r}")
    first, last = match.groups()
    if first == "":
        suffix = _position(last, size)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("an empty suffix range")
        return ByteRange(max(0, size - suffix), size)
    start = _position(first, size)
    end = size if last == "" else _position(last, size) + 1
    if end <= start:
        raise RangeNotSatisfiable(f"the range ends before it starts: {header[:80]!r}")
    if start >= size:
        raise RangeNotSatisfiable(f"the range starts past the end ({size} bytes)")
    return ByteRange(start, min(end, size))


def _position(digits: str, size: int) -> int:
    """A byte position; one longer than `MAX_POSITION_DIGITS` digits is past any end, so `size` stands for it."""
    stripped = digits.lstrip("0") or "0"
    return int(stripped) if len(stripped) <= MAX_POSITION_DIGITS else max(size, 10**MAX_POSITION_DIGITS)


def etag_of(info: BlobInfo) -> str:
    """A strong validator: the content's sha256 when the store knows it, else its size and time (as nginx does)."""
    if info.sha256:
        return f'"{info.sha256[:32]}"'
    return f'"{info.size_bytes:x}-{int(info.modified_at * 1_000_000):x}"'


def http_date(at: float) -> str:
    return formatdate(int(at), usegmt=True)


def _epoch(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def not_modified(headers: Mapping[str, str], etag: str, modified_at: float) -> bool:
    """If-None-Match (weak comparison), else If-Modified-Since: the client's copy is current."""
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
        return "*" in tags or etag in tags
    if_modified_since = headers.get("if-modified-since")
    if if_modified_since is not None:
        since = _epoch(if_modified_since)
        return since is not None and int(modified_at) <= since
    return False


def range_applies(headers: Mapping[str, str], etag: str, modified_at: float) -> bool:
    """If-Range: the range is served only if the client's validator still matches (strong comparison)."""
    if_range = headers.get("if-range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == etag
    at = _epoch(if_range)
    return at is not None and int(at) == int(modified_at)


def content_type_of(key: str) -> str:
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")
