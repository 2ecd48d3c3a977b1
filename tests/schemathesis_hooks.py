"""Schemathesis hooks for tests/test_openapi_truth.py (loaded through tests/schemathesis.toml)."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.serializer("application/offset+octet-stream")
def offset_octet_stream(ctx: Any, value: Any) -> bytes:
    """A tus PATCH body is raw bytes, as application/octet-stream is (schemathesis knows only the latter)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()
