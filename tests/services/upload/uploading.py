"""What upload tests send and look at: streamed bodies (raw and multipart/form-data) and the bucket's files."""

from __future__ import annotations

import base64
import os
import secrets
import struct
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path


def bucket_files(bucket: Path) -> list[str]:
    """Every file under the bucket, hidden temporary files included, as paths relative to it."""
    if not bucket.exists():
        return []
    return sorted(str(Path(root, name).relative_to(bucket)) for root, _, names in os.walk(bucket) for name in names)


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def multipart(
    fields: Iterable[tuple[str, str]] = (),
    file: tuple[str, AsyncIterable[bytes]] | None = None,
    *,
    file_first: bool = False,
    close: bool = True,
) -> tuple[str, AsyncIterator[bytes]]:
    """A streamed multipart/form-data body (content type, chunks) with `fields` and an optional `file` part."""
    boundary = secrets.token_hex(12)
    fields = list(fields)

    async def body() -> AsyncIterator[bytes]:
        def text(name: str, value: str) -> bytes:
            return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()

        if not file_first:
            for name, value in fields:
                yield text(name, value)
        if file is not None:
            filename, data = file
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            async for chunk in data:
                yield chunk
            yield b"\r\n"
        if file_first:
            for name, value in fields:
                yield text(name, value)
        if close:
            yield f"--{boundary}--\r\n".encode()

    return f"multipart/form-data; boundary={boundary}", body()


TUS = {"Tus-Resumable": "1.0.0"}


def tus_metadata(**fields: str) -> str:
    """An `Upload-Metadata` header: each value base64-encoded, as tus says."""
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in fields.items())


def padded(clip: bytes, size: int) -> bytes:
    """`clip` (an MP4) grown to `size` bytes with an MP4 `free` box, which every demuxer skips: a real video
    of any size at the cost of writing zeros."""
    filler = size - len(clip) - 16
    return clip + struct.pack(">I4sQ", 1, b"free", 16 + filler) + bytes(filler)
