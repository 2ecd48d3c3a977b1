"""Reading request bodies with a size limit, so an oversized body is refused as soon as it crosses it."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope

from services.common.errors import PayloadTooLarge


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The body of a Starlette request (which must not have been read yet), within `limit_bytes`."""
    return await read_asgi_body(request.scope, request.receive, limit_bytes)


async def read_asgi_body(scope: Scope, receive: Receive, limit_bytes: int) -> bytes:
    """The request body straight from ASGI messages (no Request object: the router's hot routes), refused with
    413 before reading when its Content-Length is over `limit_bytes`, and as soon as what arrives crosses it."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit_bytes:
                raise PayloadTooLarge("body", f"at most {limit_bytes} bytes, got {value.decode()}")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLarge("body", f"at most {limit_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that hands out `messages` (a body read already) first, then defers to the server (to hear
    of a disconnect): how a body read ahead of an app is handed to it."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
