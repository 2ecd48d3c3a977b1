"""Reading request bodies with a size limit, so an oversized body is refused as soon as it crosses it."""

from __future__ import annotations

from starlette.requests import Request

from services.common.errors import PayloadTooLarge


async def read_body(request: Request, limit_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLarge("body", f"at most {limit_bytes} bytes, got {declared}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLarge("body", f"at most {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
