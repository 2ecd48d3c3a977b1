"""The processing service's events leave through a durable outbox: a router that is away loses none of them."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from router.client import RouterClient
from services.common.db import SQLiteDatabase
from services.processing import events
from services.processing.events import MIGRATIONS, EventSink


def sink_for(path: Path, client: RouterClient) -> EventSink:
    return EventSink(SQLiteDatabase(path, MIGRATIONS, name="outbox"), client)


async def test_events_the_router_cannot_take_wait_in_the_outbox_and_go_out_after_a_restart(
    tmp_path: Path, router_app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.db"
    with socket.socket() as sock:  # a router that is gone: nobody listens on this port
        sock.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with RouterClient(gone, retries=0) as client:
            sink = sink_for(path, client)
            await sink.open()
            tasks = [asyncio.create_task(sink.run()), asyncio.create_task(sink.run_relay())]
            for n in range(12):
                sink.announce(events.progress("v1", "1.1-ab", n + 1, percent=n * 8.0, speed=1.0))
            await sink.publish(
                events.scaled("i1", "5eed", 1, from_=1, to=0, backlog=0, in_flight=0, busy=0, reason="shutdown")
            )
            await sink.close(timeout_s=0.5)
            await asyncio.gather(*tasks, return_exceptions=True)
    assert "dropped" not in caplog.text
    assert "13 event(s) kept in the outbox" in caplog.text

    # The next start publishes them, in order, once the router answers.
    transport = httpx.ASGITransport(app=router_app)
    async with RouterClient("http://router", transport=transport) as observer:
        await observer.ensure_subscription(
            "observer", pattern={"source": ["cattube/processing"]}, target={"queue": {}}, start="earliest"
        )
        async with RouterClient("http://router", transport=transport, retries=0) as client:
            sink = sink_for(path, client)
            await sink.open()
            relay = asyncio.create_task(sink.run_relay())
            seen: list[str] = []
            async with asyncio.timeout(10):
                while len(seen) < 13:
                    for message in await observer.queue("observer").receive(max_messages=10, wait_s=5):
                        seen.append(message.event["id"])
            await sink.close(timeout_s=1)
            await asyncio.gather(relay, return_exceptions=True)
    assert seen == [f"v1/progress/1.1-ab/{n + 1}" for n in range(12)] + ["scaled/i1/5eed/1"]
