"""The router's own cost per request on its event loop: publish and ack driven in-process, through the ASGI app.

    .venv/bin/python bench/routes.py [--requests 4000] [--rounds 3]

No sockets and no load generator: each request is one call of the app (middleware, routing, the route,
the bus) with the ASGI messages a server would hand it, 16 at a time. What is measured is the CPU time
of the event loop's thread (`time.thread_time`) per request: the store's commits run on threads of
their own and are left out, so the number is the request machinery and the route, which is what
differs between two versions of the code. Run it in each checkout (it imports the `router` beside it).
SQLite in `batched` durability, so fsyncs do not stretch the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.app import create_app
from router.settings import RouterSettings

CONCURRENCY = 16


def event(n: int) -> bytes:
    body = {"specversion": "1.0", "id": f"r-{n}", "source": "bench", "type": "bench.event"}
    return json.dumps({**body, "datacontenttype": "application/json", "data": {"payload": "x" * 900, "n": n}}).encode()


async def call(app: Any, method: str, path: str, body: bytes, content_type: bytes) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"router"),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8700),
        "state": {},
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def measure(requests: list[tuple[str, str, bytes, bytes]], app: Any, expect: int) -> float:
    """Loop-thread CPU µs per request, CONCURRENCY at a time."""
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            method, path, body, content_type = queue.pop()
            status, answer = await call(app, method, path, body, content_type)
            if status != expect:
                raise RuntimeError(f"{path}: {status} {answer[:300]!r}")

    started = time.thread_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return (time.thread_time() - started) / len(requests) * 1e6


async def one_round(count: int, first: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data:
        app = create_app(RouterSettings(data_dir=Path(data), router_durability="batched"), exit_on_failure=False)
        async with app.router.lifespan_context(app):
            queue = json.dumps({"pattern": {"source": ["bench"]}, "target": {"queue": {}}}).encode()
            await call(app, "PUT", "/subscriptions/q", queue, b"application/json")
            cloudevent = b"application/cloudevents+json"
            publishes = [("POST", "/events", event(first + n), cloudevent) for n in range(count)]
            publish_us = await measure(publishes, app, 202)
            receipts: list[list[str]] = []
            receive = json.dumps({"max_messages": 10, "visibility_timeout_s": 600}).encode()
            while len(receipts) * 10 < count:
                _, answer = await call(app, "POST", "/subscriptions/q/receive", receive, b"application/json")
                receipts.append([m["receipt"] for m in json.loads(answer)["messages"]])
            acks = [
                ("POST", "/subscriptions/q/ack", json.dumps({"receipts": r}).encode(), b"application/json")
                for r in receipts
            ]
            ack_us = await measure(acks, app, 200)
    return {"publish_us_per_request": round(publish_us, 1), "ack_us_per_request": round(ack_us, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import uvloop

    load = os.getloadavg()
    rounds = [uvloop.run(one_round(args.requests, n * args.requests)) for n in range(args.rounds)]
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": load}
    for key in rounds[0]:
        result[key] = sorted(r[key] for r in rounds)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
