"""`POST /subscriptions/{name}/stream`: streaming receive over one long response (router.streams).

The answer is newline-delimited JSON (`application/x-ndjson`): one message per line, in the shape of
receive's messages (`{"receipt", "attempt", "sequence", "event"}`), and `{"heartbeat": true}` after
`heartbeat_s` without one, so proxies keep the connection and a client notices a router that went away.
Served as a plain ASGI response (FastAPI's per-request machinery is not needed for one request per
stream, but the same handler keeps the FastAPI route for /docs). Validation, ownership, the subscription
and the cap on streams are checked before the response starts, so they answer problem+json as usual.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from router.bus import Bus
from router.models import StreamIn
from router.persistence import Message, now_ms
from services.common.body import read_body

HEARTBEAT = b'{"heartbeat":true}\n'
NDJSON = "application/x-ndjson"
MAX_BODY_BYTES = 4096

STREAM_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": (
            'Newline-delimited JSON, one line per message (as receive\'s `messages`), `{"heartbeat": true}`'
            " after `heartbeat_s` without one. Ends on shutdown, when the subscription is deleted, or when"
            " the client hangs up (its leased messages not yet sent are released at once)."
        ),
        "content": {
            NDJSON: {
                "schema": {
                    "type": "object",
                    "properties": {
                        "receipt": {"type": "string"},
                        "attempt": {"type": "integer"},
                        "sequence": {"type": "integer"},
                        "event": {"type": "object"},
                        "heartbeat": {"type": "boolean"},
                    },
                }
            }
        },
    },
    503: {"description": "This router serves CATTUBE_MAX_STREAMS streams already, or is shutting down."},
}


def message_line(message: Message) -> bytes:
    # The stored event JSON is spliced in as it is, as receive does.
    return b'{"receipt":%s,"attempt":%d,"sequence":%d,"event":%s}\n' % (
        json.dumps(message.receipt).encode(),
        message.attempt,
        message.sequence,
        message.event,
    )


async def stream(request: Request) -> Response:
    """Stream messages, holding at most `prefetch` leased and not yet acked or nacked (acks go to `/ack`)."""
    from router.api import check_owner  # the API module imports this one for its FastAPI route

    body = await read_body(request, MAX_BODY_BYTES)
    try:
        params = StreamIn.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    name: str = request.path_params["name"]
    await check_owner(request)
    bus: Bus = request.app.state.bus
    await bus.queue(name)
    bus.streams.admit()
    return NdjsonStream(bus, name, params)


class NdjsonStream(Response):
    media_type = NDJSON

    def __init__(self, bus: Bus, name: str, params: StreamIn) -> None:
        super().__init__(media_type=NDJSON, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        del self.headers["content-length"]
        self.bus = bus
        self.name = name
        self.params = params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        bus = self.bus
        gone = asyncio.Event()
        watcher = asyncio.create_task(_disconnected(receive, gone))
        batches = bus.streams.run(
            self.name, self.params.prefetch, self.params.visibility_timeout_s, self.params.heartbeat_s, gone
        )
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for messages in batches:
                if gone.is_set():
                    await bus.store.release(self.name, [m.receipt for m in messages], now_ms())
                    break
                chunk = b"".join(map(message_line, messages)) if messages else HEARTBEAT
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    gone.set()
                if gone.is_set():  # hung up while it was being sent: it may never have arrived
                    await bus.store.release(self.name, [m.receipt for m in messages], now_ms())
                    break
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception as exc:  # the subscription was deleted, or the store failed mid-stream: end the response
            if not gone.is_set():
                line = json.dumps({"error": str(exc) or type(exc).__name__}).encode() + b"\n"
                await send({"type": "http.response.body", "body": line, "more_body": False})
        finally:
            await batches.aclose()
            watcher.cancel()
            bus.streams.done()


STREAM_ROUTE = Route("/subscriptions/{name}/stream", stream, methods=["POST"])
"""The stream as a plain Starlette route, matched ahead of FastAPI's (which stays for /docs)."""


async def _disconnected(receive: Receive, gone: asyncio.Event) -> None:
    """Set `gone` when the client hangs up (the body is read already, so the next message says so)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
