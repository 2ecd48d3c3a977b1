"""The hot routes as plain ASGI endpoints: publish, and ack / nack / extend of queue messages.

FastAPI's per-request machinery (dependency solving, body models, response models) and Starlette's
Request cost more than these routes' own work (bench/README.md). So `create_app` puts these plain
routes ahead of FastAPI's, which stay for /docs. Each reads what it needs from the ASGI scope and
answers with bytes it writes itself; errors are raised as `CatTubeError`s, which the app's problem
handlers answer as before.

ack / nack / extend take the common, valid body (`{"receipts": [...]}` and a number in range) on
the fast path; any other body is handed, unread by us, to FastAPI's route, so every refusal is
FastAPI's own problem+json, field for field.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from router import cloudevents
from router.bus import Bus
from router.metrics import RouterMetrics
from router.persistence import ReceiptResult
from router.settings import RouterSettings
from services.common.body import read_asgi_body, replay

JSON_HEADERS = [(b"content-type", b"application/json")]
MAX_RECEIPTS = 100  # router.models.AckIn
MAX_DELAY_S = 43_200  # router.models.NackIn, ExtendIn

OwnerCheck = Callable[[Bus, Scope, str], Awaitable[None]]


async def answer(send: Send, status: int, body: bytes) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _publish(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /events (router.api.publish documents it)."""
    state = scope["app"].state
    settings: RouterSettings = state.settings
    metrics: RouterMetrics = state.metrics
    started = time.perf_counter()
    body = await read_asgi_body(scope, receive, settings.max_request_bytes)
    headers = Headers(scope=scope)
    events = cloudevents.parse(body, headers.get("content-type", ""), headers, settings.max_event_bytes)
    results = await state.bus.publish(events)
    metrics.publish_latency.observe(time.perf_counter() - started)
    metrics.published.inc(sum(not r.duplicate for r in results))
    payload = {"results": [{"id": r.id, "sequence": r.sequence, "duplicate": r.duplicate} for r in results]}
    await answer(send, 202, orjson.dumps(payload))


class PublishRoute:
    """`_publish` as an ASGI app (Starlette would wrap a plain function in its Request machinery)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _publish(scope, receive, send)


def _seconds(value: Any) -> bool:
    """A JSON number pydantic reads as the same float, within 0..MAX_DELAY_S."""
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= MAX_DELAY_S


def _receipts(body: dict[str, Any]) -> list[str] | None:
    receipts = body.get("receipts")
    if type(receipts) is not list or not 1 <= len(receipts) <= MAX_RECEIPTS:
        return None
    return receipts if all(type(r) is str for r in receipts) else None


class ReceiptsRoute:
    """POST /subscriptions/{name}/ack|nack|extend; `fallback` serves the bodies this route does not take: FastAPI's
    route for the same path (its `handle`), or, behind the front door (router/front.py), the whole app."""

    FIELDS = {"ack": ("receipts",), "nack": ("receipts", "delay_s"), "extend": ("receipts", "visibility_timeout_s")}

    def __init__(self, verb: str, check_owner: OwnerCheck, fallback: ASGIApp) -> None:
        self.verb = verb
        self.fields = frozenset(self.FIELDS[verb])
        self.check_owner = check_owner
        self.fallback = fallback

    def _fast(self, body: bytes) -> tuple[list[str], float] | None:
        """The receipts and the number of a body FastAPI's model would take unchanged, else None."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if type(parsed) is not dict or not parsed.keys() <= self.fields:
            return None
        receipts = _receipts(parsed)
        if receipts is None:
            return None
        if self.verb == "ack":
            return receipts, 0.0
        if self.verb == "nack":
            delay = parsed.get("delay_s", 0)
            return (receipts, float(delay)) if _seconds(delay) else None
        timeout: Any = parsed.get("visibility_timeout_s")
        return (receipts, float(timeout)) if _seconds(timeout) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        settings: RouterSettings = app.state.settings
        body = await read_asgi_body(scope, receive, settings.max_body_bytes)
        fast = self._fast(body)
        if fast is None:
            await self.fallback(
                scope, replay([{"type": "http.request", "body": body, "more_body": False}], receive), send
            )
            return
        receipts, seconds = fast
        bus: Bus = app.state.bus
        name: str = scope["path_params"]["name"]
        await self.check_owner(bus, scope, name)
        results: list[ReceiptResult]
        if self.verb == "ack":
            results = await bus.ack(name, receipts)
        elif self.verb == "nack":
            results = await bus.nack(name, receipts, seconds)
        else:
            results = await bus.extend(name, receipts, seconds)
        payload = {"results": [{"receipt": r.receipt, "ok": r.ok, "error": r.error} for r in results]}
        await answer(send, 200, orjson.dumps(payload))


def hot_routes(routes: list[BaseRoute], check_owner: OwnerCheck) -> list[Route]:
    """The plain routes to put ahead of FastAPI's `routes` (the API router's, each the fallback of its path)."""
    hot = [Route("/events", PublishRoute(), methods=["POST"])]
    for verb in ("ack", "nack", "extend"):
        path = f"/subscriptions/{{name}}/{verb}"
        fallback = next(r for r in routes if getattr(r, "path", None) == path)
        endpoint: ASGIApp = ReceiptsRoute(verb, check_owner, fallback.handle)
        hot.append(Route(path, endpoint, methods=["POST"]))
    return hot
