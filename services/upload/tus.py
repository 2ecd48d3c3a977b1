"""The tus 1.0 resumable upload protocol (https://tus.io/protocols/resumable-upload): its headers, read strictly.

    require_version(headers)                          # 412 unless `Tus-Resumable: 1.0.0`
    length = upload_length(headers, max_bytes=limit)  # 400 / 413
    metadata = parse_metadata("filename Y2F0Lm1wNA==,title V2hpc2tlcnM=")   # {"filename": "cat.mp4", ...}
    checksum = parse_checksum("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=")         # Checksum("sha1", b"...")

Every refusal is an error of `services.common.errors` (or one of the two tus adds: 412 and 460)
naming the header and what was expected, so it is answered as problem+json like the rest of the service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.errors import BadRequest, CatTubeError, PayloadTooLarge, UnsupportedMedia

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "EXTENSIONS",
    "OFFSET_OCTET_STREAM",
    "VERSION",
    "Checksum",
    "ChecksumMismatch",
    "VersionMismatch",
    "parse_checksum",
    "parse_metadata",
    "require_offset_stream",
    "require_version",
    "upload_length",
    "upload_offset",
]

VERSION = "1.0.0"
# Creation (POST), termination (DELETE), checksum (Upload-Checksum on PATCH), expiration (Upload-Expires).
EXTENSIONS = ("creation", "termination", "checksum", "expiration")
# sha1 is the one every tus server with the checksum extension must know; the others cost nothing more.
CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256")
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
MAX_METADATA_CHARS = 8 * 1024


class VersionMismatch(CatTubeError):
    """412: the request speaks another version of tus than 1.0.0, or does not say which."""

    status = 412
    title = "Precondition failed"


class ChecksumMismatch(CatTubeError):
    """460 (tus' own status): the bytes of a PATCH do not have the checksum the client sent with them."""

    status = 460
    title = "Checksum mismatch"


def require_version(headers: Mapping[str, str]) -> None:
    """The request must say `Tus-Resumable: 1.0.0`, the only version served."""
    given = headers.get("tus-resumable")
    if given != VERSION:
        got = "none" if given is None else repr(given[:20])
        raise VersionMismatch(
            f"Tus-Resumable: expected {VERSION} (the tus version this server speaks), got {got}",
            errors=[{"field": "header.Tus-Resumable", "expected": VERSION}],
        )


def _non_negative(headers: Mapping[str, str], name: str) -> int:
    raw = headers.get(name.lower())
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        got = "none" if raw is None else repr(raw[:20])
        raise BadRequest(f"header.{name}", f"a non-negative integer, got {got}")
    return int(raw)


def upload_length(headers: Mapping[str, str], *, max_bytes: int) -> int:
    """`Upload-Length`: the size of the whole upload, at least one byte and at most `max_bytes` (413 above)."""
    if "upload-defer-length" in headers:
        raise BadRequest("header.Upload-Defer-Length", "no such header: this server needs Upload-Length at creation")
    length = _non_negative(headers, "Upload-Length")
    if length == 0:
        raise BadRequest("header.Upload-Length", "a non-empty video file (at least 1 byte)")
    if length > max_bytes:
        raise PayloadTooLarge("header.Upload-Length", f"at most {max_bytes} bytes, got {length}")
    return length


def upload_offset(headers: Mapping[str, str]) -> int:
    """`Upload-Offset` of a PATCH: where its bytes go."""
    return _non_negative(headers, "Upload-Offset")


def require_offset_stream(headers: Mapping[str, str]) -> None:
    """A PATCH body must be declared `application/offset+octet-stream` (415 otherwise)."""
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != OFFSET_OCTET_STREAM:
        raise UnsupportedMedia(
            f"Content-Type: expected {OFFSET_OCTET_STREAM}, got {media or 'none'!r}",
            errors=[{"field": "header.Content-Type", "expected": OFFSET_OCTET_STREAM}],
        )


def parse_metadata(raw: str | None) -> dict[str, str | None]:
    """`Upload-Metadata`: comma-separated `key base64(value)` pairs (a value may be left out).

    Keys are unique, non-empty ASCII without spaces or commas; values must be valid base64 of UTF-8 text.
    """
    if raw is None or not raw.strip():
        return {}
    if len(raw) > MAX_METADATA_CHARS:
        raise BadRequest("header.Upload-Metadata", f"at most {MAX_METADATA_CHARS} characters")
    pairs: dict[str, str | None] = {}
    for item in raw.split(","):
        key, _, encoded = item.strip().partition(" ")
        if not key or not key.isascii() or not key.isprintable():
            raise BadRequest("header.Upload-Metadata", f"comma-separated 'key base64value' pairs; got {item[:40]!r}")
        if key in pairs:
            raise BadRequest(f"header.Upload-Metadata.{key}", "each key once")
        pairs[key] = _decoded(key, encoded.strip()) if encoded.strip() else None
    return pairs


def _decoded(key: str, encoded: str) -> str:
    try:
        return base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequest(f"header.Upload-Metadata.{key}", "base64 of UTF-8 text") from None


@dataclass(frozen=True)
class Checksum:
    """What a PATCH's `Upload-Checksum` says its bytes hash to."""

    algorithm: str
    digest: bytes

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def check(self, hasher: hashlib._Hash) -> None:
        if hasher.digest() != self.digest:
            raise ChecksumMismatch(
                f"Upload-Checksum: the {self.algorithm} of the bytes received differs from the one sent; "
                "nothing of this request was kept: send it again",
                errors=[{"field": "header.Upload-Checksum", "expected": f"the {self.algorithm} of the body"}],
            )


def parse_checksum(raw: str | None) -> Checksum | None:
    """`Upload-Checksum: <algorithm> <base64 digest>`, or None when the PATCH has none."""
    if raw is None:
        return None
    algorithm, _, encoded = raw.strip().partition(" ")
    if algorithm.lower() not in CHECKSUM_ALGORITHMS:
        shown = ", ".join(CHECKSUM_ALGORITHMS)
        raise BadRequest("header.Upload-Checksum", f"an algorithm out of {shown}, got {algorithm[:20]!r}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("header.Upload-Checksum", "the algorithm, a space and the base64 digest") from None
    checksum = Checksum(algorithm.lower(), digest)
    if len(digest) != checksum.hasher().digest_size:
        raise BadRequest(
            "header.Upload-Checksum", f"a {algorithm.lower()} digest of {checksum.hasher().digest_size} bytes"
        )
    return checksum
