"""A bound on every request body a service reads whole.

FastAPI reads a route's whole body before it validates it, whatever its content type: a 105 MB
`PUT /subscriptions/big` was accepted and echoed back at 815 MB RSS. `BodyLimitMiddleware` reads
the body first, up to `max_bytes`, and answers 413 problem+json past it (at once when
`Content-Length` says so, or as soon as a chunked body crosses it), so the app never sees it.
Routes that stream their body (an upload, the router's publish path) are named in `streaming` and
keep their own limits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.body import replay
from services.common.problems import problem_response
from services.common.settings import CommonSettings


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, streaming: Iterable[tuple[str, str]] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # A plain path (the router's POST /events) is a set lookup, not a regex, on every request.
        routes = list(streaming)
        self.literal = frozenset((method, path) for method, path in routes if re.escape(path) == path)
        self.streaming = [(method, re.compile(path)) for method, path in routes if (method, path) not in self.literal]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._streams(scope):
            await self.app(scope, receive, send)
            return
        bounded = await read_within(self.max_bytes, scope, receive, send)
        if bounded is not None:
            await self.app(scope, bounded, send)

    def _streams(self, scope: Scope) -> bool:
        method, path = scope["method"], scope["path"]
        if (method, path) in self.literal:
            return True
        return any(method == m and pattern.fullmatch(path) for m, pattern in self.streaming)


async def read_within(max_bytes: int, scope: Scope, receive: Receive, send: Send) -> Receive | None:
    """The middleware's work on one request: read its body, up to `max_bytes`, and return a `receive` that
    hands it to the app (`receive` itself for a request without a body); past the bound, answer 413 and
    return None. The router's front door (router/front.py) calls it for its hot routes, so both answer alike."""
    declared = _declared_body(scope)
    if declared is None:
        return receive
    if declared.isdigit() and int(declared) > max_bytes:
        await _refuse(scope, receive, send, f"at most {max_bytes} bytes, got {int(declared)}")
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: let the app see it as it would have
            return replay([message], receive)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            await _refuse(scope, receive, send, f"at most {max_bytes} bytes")
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


async def _refuse(scope: Scope, receive: Receive, send: Send, expected: str) -> None:
    # `Connection: close`: the rest of the body is not worth reading to keep the connection.
    response = problem_response(
        413,
        "Payload too large",
        f"body: expected {expected}",
        errors=[{"field": "body", "expected": expected}],
        headers={"connection": "close"},
    )
    await response(scope, receive, send)


def _declared_body(scope: Scope) -> bytes | None:
    """None for a request without a body; else its Content-Length (b"" when chunked), in one pass."""
    length: bytes | None = None
    chunked = False
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    if length is not None and length != b"0":
        return length
    return b"" if chunked else None


def bound_request_bodies(app: FastAPI, settings: CommonSettings, *, streaming: Iterable[tuple[str, str]] = ()) -> None:
    """Install `BodyLimitMiddleware` with the service's `max_body_bytes`; `streaming` lists the
    `(method, path regex)` of the routes that read their body as a stream under their own limit."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, streaming=list(streaming))
