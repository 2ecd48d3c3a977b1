"""The router's HTTP API: publishing, subscriptions, queues, stats, dead letters, pattern tests."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import Scope

from router import cloudevents, stream_api
from router.bus import Bus
from router.metrics import RouterMetrics
from router.models import (
    AckIn,
    CountOut,
    DeliveryIn,
    ExtendIn,
    NackIn,
    PatternTestIn,
    PatternTestOut,
    PublishOut,
    ReceiptOut,
    ReceiptsOut,
    ReceiveIn,
    ReplayIn,
    ReplayOut,
    StatsOut,
    StreamIn,
    SubscriptionIn,
    SubscriptionList,
    SubscriptionOut,
)
from router.patterns import Pattern, PatternError, PatternTooLarge, compile_pattern
from router.persistence import Delivery, ReceiptResult, Replay, Subscription, SubscriptionSpec
from router.settings import RouterSettings
from services.common.auth import Access, AccessRules, granted_access
from services.common.body import read_body
from services.common.errors import Forbidden, InvalidInput, PayloadTooLarge
from services.common.openapi import problems
from services.common.timestamps import iso_utc


# `async def` on purpose: FastAPI runs a plain `def` dependency in a thread pool (a thread hop
# per request for nothing).
async def get_bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


BusDep = Annotated[Bus, Depends(get_bus)]
SUBSCRIPTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")

# What each route needs (services/common/auth.py); a route not named here needs admin. Services publish
# and work their own subscriptions with the service token; replaying, dead letters and the list of
# every subscription (with push secrets) are the operator's.
ACCESS = AccessRules(
    [
        ("POST", "/events", Access.SERVICE),
        ("POST", "/patterns/test", Access.SERVICE),
        ("GET", "/subscriptions", Access.ADMIN),
        ("GET PUT DELETE", "/subscriptions/{name}", Access.SERVICE),
        ("POST", "/subscriptions/{name}/receive", Access.SERVICE),
        ("POST", "/subscriptions/{name}/stream", Access.SERVICE),
        ("POST", "/subscriptions/{name}/ack", Access.SERVICE),
        ("POST", "/subscriptions/{name}/nack", Access.SERVICE),
        ("POST", "/subscriptions/{name}/extend", Access.SERVICE),
        ("GET", "/subscriptions/{name}/stats", Access.SERVICE),
        ("GET DELETE", "/subscriptions/{name}/dead-letters", Access.ADMIN),
        ("POST", "/subscriptions/{name}/dead-letters/redrive", Access.ADMIN),
        ("POST", "/subscriptions/{name}/replay", Access.ADMIN),
        ("GET", "/subscriptions/{name}/replays/{replay}", Access.ADMIN),
    ]
)


async def check_owner(request: Request) -> None:
    """A service token reaches only subscriptions a service created; an admin's are the admin's."""
    name = request.path_params.get("name")
    if name is not None:
        await ensure_owner(request.app.state.bus, request.scope, name)


async def ensure_owner(bus: Bus, scope: Scope, name: str) -> None:
    """`check_owner` for a request's ASGI scope (the plain routes of router/hot_routes.py)."""
    if granted_access(scope) is not Access.SERVICE:
        return
    sub = await bus.find_subscription(name)
    if sub is not None and sub.spec.owner != Access.SERVICE.label:
        raise Forbidden(
            f"subscription {name!r} was created with the admin token; only the admin token may use it",
            errors=[{"field": "header.Authorization", "expected": "Bearer <CATTUBE_TOKEN>"}],
        )


def owner_of_new(request: Request) -> str:
    """An admin's subscription is kept from service tokens only when there are service tokens to keep out."""
    settings: RouterSettings = request.app.state.settings
    admin = granted_access(request.scope) is Access.ADMIN and settings.service_token_value is not None
    return Access.ADMIN.label if admin else Access.SERVICE.label


router = APIRouter(dependencies=[Depends(check_owner)])

CLOUDEVENT = {
    "type": "object",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"type": "string", "enum": ["1.0"]},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1},
        "subject": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {"type": "string"},
        "dataschema": {"type": "string", "format": "uri"},
        "partitionkey": {"type": "string", "description": "Ordering key (the video id for video events)."},
        "data": {"description": "Any JSON value, nested at most 64 deep."},
        "data_base64": {"type": "string", "format": "byte"},
    },
    "additionalProperties": {"type": ["string", "integer", "boolean"], "description": "Extension attributes."},
}
PUBLISH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "A CloudEvent (structured mode), a JSON array of them (batched mode), or binary mode: `ce-*` headers "
            "carry the attributes and the body is the data. Strings hold no control characters, surrogates or "
            "noncharacters; integers are 32-bit; an event is at most CATTUBE_MAX_EVENT_BYTES."
        ),
        "content": {
            cloudevents.STRUCTURED: {"schema": CLOUDEVENT},
            cloudevents.BATCH: {"schema": {"type": "array", "minItems": 1, "items": CLOUDEVENT}},
        },
    }
}


@router.post("/events", status_code=202, response_model=PublishOut, openapi_extra=PUBLISH_BODY, tags=["events"])
async def publish(request: Request) -> Response:
    """Publish CloudEvents (structured, batched or binary mode); answered once they are durable."""
    # The hot path (served as a plain Starlette route, see app.py): collaborators come straight from
    # app.state; FastAPI's dependency solving cost ~80 µs a request here (bench/README.md).
    state = request.app.state
    settings: RouterSettings = state.settings
    metrics: RouterMetrics = state.metrics
    started = time.perf_counter()
    body = await read_body(request, settings.max_request_bytes)
    headers = request.headers
    events = cloudevents.parse(body, headers.get("content-type", ""), headers, settings.max_event_bytes)
    results = await state.bus.publish(events)
    metrics.publish_latency.observe(time.perf_counter() - started)
    metrics.published.inc(sum(not r.duplicate for r in results))
    payload = {"results": [{"id": r.id, "sequence": r.sequence, "duplicate": r.duplicate} for r in results]}
    return Response(json.dumps(payload, separators=(",", ":")), status_code=202, media_type="application/json")


@router.post("/patterns/test", response_model=PatternTestOut, tags=["events"])
async def test_pattern(body: PatternTestIn) -> PatternTestOut:
    """Does this pattern match this event? (EventBridge's TestEventPattern.)"""
    return PatternTestOut(match=_compile(body.pattern).matches(body.event))


def _compile(pattern: dict[str, Any]) -> Pattern:
    """Compile a pattern from a request, within `router.patterns.LIMITS` (checked before anything is stored)."""
    try:
        return compile_pattern(pattern)
    except PatternTooLarge as exc:
        raise PayloadTooLarge("pattern", exc.reason) from None
    except PatternError as exc:
        raise InvalidInput(f"pattern.{exc.path}" if exc.path else "pattern", exc.reason) from None


def _iso(ms: int) -> str:
    return iso_utc(ms / 1000)


def _out(sub: Subscription) -> SubscriptionOut:
    spec = sub.spec
    return SubscriptionOut(
        name=spec.name,
        pattern=spec.pattern,
        target=spec.target,
        delivery=DeliveryIn.model_validate(spec.delivery, from_attributes=True),
        start_sequence=sub.start_sequence,
        created_at=_iso(sub.created_at_ms),
        secret=None if spec.is_queue else sub.secret,
        owner=spec.owner,
    )


@router.put(
    "/subscriptions/{name}",
    response_model=SubscriptionOut,
    responses={201: {"model": SubscriptionOut, "description": "Created"}, **problems(409)},
    tags=["subscriptions"],
)
async def put_subscription(name: str, body: SubscriptionIn, bus: BusDep, request: Request) -> JSONResponse:
    """Create or update a subscription (idempotent); 201 when created, 200 otherwise; 409 when creating one
    would pass `CATTUBE_MAX_SUBSCRIPTIONS` (10,000)."""
    _check_name(name)
    existing = await bus.find_subscription(name)
    spec = SubscriptionSpec(
        name=name,
        pattern=body.pattern,
        compiled=None if body.pattern is None else _compile(body.pattern),
        target=body.target.as_json(),
        delivery=Delivery(**body.delivery.model_dump()),
        start=body.start,
        owner=existing.spec.owner if existing is not None else owner_of_new(request),
    )
    sub, created = await bus.put_subscription(spec)
    return JSONResponse(_out(sub).model_dump(mode="json"), status_code=201 if created else 200)


def _check_name(name: str) -> None:
    if not SUBSCRIPTION_NAME.fullmatch(name):
        raise InvalidInput("path.name", "1-80 letters, digits, '.', '_' or '-', starting with a letter or digit")


@router.get("/subscriptions", response_model=SubscriptionList, tags=["subscriptions"])
async def list_subscriptions(bus: BusDep) -> SubscriptionList:
    """Every subscription."""
    return SubscriptionList(items=[_out(sub) for sub in await bus.list_subscriptions()])


@router.get("/subscriptions/{name}", response_model=SubscriptionOut, tags=["subscriptions"])
async def get_subscription(name: str, bus: BusDep) -> SubscriptionOut:
    """One subscription."""
    return _out(await bus.subscription(name))


@router.delete("/subscriptions/{name}", status_code=204, tags=["subscriptions"])
async def delete_subscription(name: str, bus: BusDep) -> Response:
    """Delete a subscription with its queued messages and dead letters."""
    await bus.delete_subscription(name)
    return Response(status_code=204)


@router.post("/subscriptions/{name}/receive", tags=["queues"])
async def receive(name: str, body: ReceiveIn, bus: BusDep, request: Request) -> Response:
    """Receive up to `max_messages` (long poll up to `wait_s`); each is hidden for `visibility_timeout_s`."""
    gone = asyncio.Event()
    watcher = asyncio.create_task(_disconnected(request, gone))
    try:
        messages = await bus.receive(name, body.max_messages, body.wait_s, body.visibility_timeout_s, gone)
    finally:
        watcher.cancel()
    # The stored event JSON is spliced in as it is: no decode and re-encode on the hot path.
    parts = [
        b'{"receipt":%s,"attempt":%d,"sequence":%d,"event":%s}'
        % (json.dumps(m.receipt).encode(), m.attempt, m.sequence, m.event)
        for m in messages
    ]
    return Response(b'{"messages":[' + b",".join(parts) + b"]}", media_type="application/json")


@router.post(
    "/subscriptions/{name}/stream",
    tags=["queues"],
    responses=stream_api.STREAM_RESPONSES,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": StreamIn.model_json_schema()}}, "required": False}
    },
)
async def stream(name: str, request: Request) -> Response:
    """Stream messages (NDJSON), holding at most `prefetch` leased and not yet acked or nacked (acks go to `ack`)."""
    # Served by the plain route ahead of this one (app.py); this one documents it, with its path parameter.
    return await stream_api.stream(request)


async def _disconnected(request: Request, gone: asyncio.Event) -> None:
    """Set `gone` when the client hangs up (the body is read already, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


def _receipts(results: list[ReceiptResult]) -> ReceiptsOut:
    return ReceiptsOut(results=[ReceiptOut(receipt=r.receipt, ok=r.ok, error=r.error) for r in results])


@router.post("/subscriptions/{name}/ack", response_model=ReceiptsOut, tags=["queues"])
async def ack(name: str, body: AckIn, bus: BusDep) -> ReceiptsOut:
    """Delete received messages: the work they asked for is done."""
    return _receipts(await bus.ack(name, body.receipts))


@router.post("/subscriptions/{name}/nack", response_model=ReceiptsOut, tags=["queues"])
async def nack(name: str, body: NackIn, bus: BusDep) -> ReceiptsOut:
    """Give received messages back, visible again after `delay_s`."""
    return _receipts(await bus.nack(name, body.receipts, body.delay_s))


@router.post("/subscriptions/{name}/extend", response_model=ReceiptsOut, tags=["queues"])
async def extend(name: str, body: ExtendIn, bus: BusDep) -> ReceiptsOut:
    """Keep received messages hidden for another `visibility_timeout_s` from now (a heartbeat)."""
    return _receipts(await bus.extend(name, body.receipts, body.visibility_timeout_s))


@router.get("/subscriptions/{name}/stats", response_model=StatsOut, tags=["queues"])
async def stats(
    name: str,
    bus: BusDep,
    wait_s: Annotated[float, Query(ge=0, le=20)] = 0,
    version: int | None = None,
) -> StatsOut:
    """Queue numbers; with `version` and `wait_s`, answers as soon as they differ from that version."""
    numbers, current = await bus.stats(name, wait_s, version)
    return StatsOut(
        backlog=numbers.backlog,
        in_flight=numbers.in_flight,
        delayed=numbers.delayed,
        dead_lettered=numbers.dead_lettered,
        oldest_age_s=numbers.oldest_age_s,
        version=current,
        delivered_total=numbers.delivered_total,
        failed_total=numbers.failed_total,
    )


@router.get("/subscriptions/{name}/dead-letters", tags=["dead letters"])
async def dead_letters(name: str, bus: BusDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    """Messages given up on, with their attempts and last error."""
    items = [
        b'{"sequence":%d,"attempts":%d,"last_error":%s,"context":%s,"dead_lettered_at":%s,"event":%s}'
        % (
            d.sequence,
            d.attempts,
            json.dumps(d.last_error).encode(),
            json.dumps(d.context).encode(),
            json.dumps(_iso(d.dead_lettered_at_ms)).encode(),
            d.event,
        )
        for d in await bus.dead_letters(name, limit)
    ]
    return Response(b'{"items":[' + b",".join(items) + b"]}", media_type="application/json")


@router.post("/subscriptions/{name}/dead-letters/redrive", response_model=CountOut, tags=["dead letters"])
async def redrive(name: str, bus: BusDep) -> CountOut:
    """Put every dead letter back as a fresh message (attempts start again)."""
    return CountOut(count=await bus.redrive(name))


@router.delete("/subscriptions/{name}/dead-letters", response_model=CountOut, tags=["dead letters"])
async def purge_dead_letters(name: str, bus: BusDep) -> CountOut:
    """Drop every dead letter of the subscription."""
    return CountOut(count=await bus.purge_dead_letters(name))


def _replay_out(replay: Replay) -> ReplayOut:
    return ReplayOut(
        name=replay.name,
        subscription=replay.subscription,
        from_sequence=replay.from_sequence,
        to_sequence=replay.to_sequence,
        total=replay.total,
        delivered=replay.delivered,
        pending=replay.pending,
        dead_lettered=replay.dead_lettered,
        done=replay.pending == 0,
        created_at=_iso(replay.created_at_ms),
    )


@router.post("/subscriptions/{name}/replay", status_code=202, response_model=ReplayOut, tags=["replays"])
async def replay(name: str, body: ReplayIn, bus: BusDep) -> ReplayOut:
    """Deliver retained matching events between `from` and `to` again, marked with a `replay` attribute."""
    replay_name = body.name or "replay-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return _replay_out(await bus.replay(name, replay_name, body.start, body.end))


@router.get("/subscriptions/{name}/replays/{replay}", response_model=ReplayOut, tags=["replays"])
async def replay_status(name: str, replay: str, bus: BusDep) -> ReplayOut:
    """How far a replay has got."""
    return _replay_out(await bus.replay_status(name, replay))
