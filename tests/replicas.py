"""Router replicas for in-process tests of the client's failover: up, down (connection refused) or 503."""

from __future__ import annotations

import json
from typing import Any

import httpx


class Replicas(httpx.AsyncBaseTransport):
    """Sends each request to the transport named for its origin (swappable mid-test), unknown origins
    over the network; remembers which origin each request went to."""

    def __init__(self, routes: dict[str, httpx.AsyncBaseTransport]) -> None:
        self.routes = routes
        self.network = httpx.AsyncHTTPTransport()
        self.seen: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
        self.seen.append(origin)
        return await self.routes.get(origin, self.network).handle_async_request(request)

    async def aclose(self) -> None:
        await self.network.aclose()


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


DOWN = httpx.MockTransport(refused)


async def unavailable(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A replica that answers 503 problem+json to everything (starting, or its database is away)."""
    body = json.dumps({"title": "Service Unavailable", "status": 503, "detail": "the database is unreachable"})
    headers = [(b"content-type", b"application/problem+json")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})
