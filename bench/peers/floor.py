"""The floor of CatTube's protocol: the router's API shape in memory, with nothing else.

`python -m bench.peers.floor PORT` serves, under the router's own server stack (uvicorn, uvloop, httptools,
access log off), just what the benchmark's CatTube clients call: `PUT`/`DELETE /subscriptions/{name}`,
`POST /events` (one CloudEvent or a batch), `POST /subscriptions/{name}/stream` (NDJSON lines, at most
`prefetch` unacked) and `POST /subscriptions/{name}/ack`. No storage, no matching, no validation, no
auth, no middleware: each event is appended to every subscription's in-memory queue.

No real broker can be cheaper than this with the same requests, so what it reaches is the ceiling of an
HTTP/1.1 design served from Python and driven by Python clients: a CatTube target above it is out of
reach for the protocol and the runtime, not for the router's code (bench/README.md says where it stands).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections import deque
from typing import Any

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send

JSON = [(b"content-type", b"application/json")]
NDJSON = [(b"content-type", b"application/x-ndjson")]


class Queue:
    def __init__(self) -> None:
        self.ready: deque[bytes] = deque()
        self.held: dict[str, int] = {}  # receipt -> the stream holding it
        self.holding: dict[int, int] = {}  # stream -> how many it holds
        self.changed = asyncio.Event()


queues: dict[str, Queue] = {}
receipts = itertools.count()
streams = itertools.count()
sequence = itertools.count(1)


async def body_of(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def answer(send: Send, status: int, payload: Any = None) -> None:
    body = b"" if payload is None else orjson.dumps(payload)
    headers = [*JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def publish(scope: Scope, receive: Receive, send: Send) -> None:
    parsed = orjson.loads(await body_of(receive))
    events = parsed if isinstance(parsed, list) else [parsed]
    for queue in queues.values():
        queue.ready.extend(orjson.dumps(event) for event in events)
        queue.changed.set()
    results = [{"id": e.get("id"), "sequence": next(sequence), "duplicate": False} for e in events]
    await answer(send, 202, {"results": results})


async def stream(name: str, receive: Receive, send: Send) -> None:
    prefetch = orjson.loads(await body_of(receive) or b"{}").get("prefetch", 10)
    queue, me = queues[name], next(streams)
    await send({"type": "http.response.start", "status": 200, "headers": NDJSON})
    while name in queues:
        free = prefetch - queue.holding.get(me, 0)
        lines = []
        while free > 0 and queue.ready:
            receipt = str(next(receipts))
            queue.held[receipt] = me
            lines.append(
                b'{"receipt":"%s","attempt":1,"sequence":0,"event":%s}\n' % (receipt.encode(), queue.ready.popleft())
            )
            free -= 1
        if lines:
            queue.holding[me] = prefetch - free
            await send({"type": "http.response.body", "body": b"".join(lines), "more_body": True})
            continue
        queue.changed.clear()
        await queue.changed.wait()


async def ack(name: str, receive: Receive, send: Send) -> None:
    queue = queues[name]
    names = orjson.loads(await body_of(receive))["receipts"]
    for receipt in names:
        if (holder := queue.held.pop(receipt, None)) is not None:
            queue.holding[holder] -= 1
    queue.changed.set()
    await answer(send, 200, {"results": [{"receipt": r, "ok": True, "error": None} for r in names]})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    method, parts = scope["method"], scope["path"].strip("/").split("/")
    if parts == ["events"]:
        await publish(scope, receive, send)
    elif len(parts) == 2 and method == "PUT":
        queues.setdefault(parts[1], Queue())
        await answer(send, 200, {})
    elif len(parts) == 2 and method == "DELETE":
        if (queue := queues.pop(parts[1], None)) is not None:
            queue.changed.set()
        await answer(send, 204)
    elif len(parts) == 3 and parts[2] == "stream":
        await stream(parts[1], receive, send)
    elif len(parts) == 3 and parts[2] == "ack":
        await ack(parts[1], receive, send)
    else:
        await answer(send, 404, {"title": "not in the floor's API"})


if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools", access_log=False, lifespan="on"
    )
