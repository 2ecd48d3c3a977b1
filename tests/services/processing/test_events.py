"""The processing service's events leave through a durable outbox: a router that is away loses none of them."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from router.client import RouterClient
from services.common.db import PostgresDatabase, SQLiteDatabase
from services.processing import events
from services.processing.events import MIGRATIONS, EventSink, OutboxUnavailable
from tests.stoppable_postgres import stoppable_postgres


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


class RecordingRouter:
    """Takes every publish and remembers the event ids, in order."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.batches: list[list[str]] = []
        self.arrived = asyncio.Event()

    def handle(self, request: httpx.Request) -> httpx.Response:
        batch = json.loads(request.content)
        self.ids += [event["id"] for event in batch]
        self.batches.append([event["id"] for event in batch])
        self.arrived.set()
        results = [{"id": event["id"], "sequence": len(self.ids), "duplicate": False} for event in batch]
        return httpx.Response(202, json={"results": results})

    def client(self) -> RouterClient:
        return RouterClient("http://router", transport=httpx.MockTransport(self.handle), retries=0)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.ids) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def test_progress_waits_for_company_and_anything_else_takes_it_along(tmp_path: Path) -> None:
    """Each running job reports once a second: one write and one publish carry every job's progress."""
    router = RecordingRouter()
    async with router.client() as client:
        # A linger far longer than the test: only another event, never the clock, can end it here.
        sink = EventSink(
            SQLiteDatabase(tmp_path / "outbox.db", MIGRATIONS, name="outbox"), client, progress_linger_s=600
        )
        await sink.open()
        tasks = [asyncio.create_task(sink.run()), asyncio.create_task(sink.run_relay())]
        sink.announce(events.progress("v1", "1.1-ab", 1, percent=25, speed=1.0))
        for _ in range(10):  # the writer takes it and waits for more
            await asyncio.sleep(0)
        sink.announce(events.progress("v2", "1.1-cd", 1, percent=50, speed=1.0))
        await sink.publish(events.failed("v2", "1.1-cd", attempt=1, permanent=True, reason="no picture"))
        await router.until(3)
        sink.announce(events.progress("v1", "1.1-ab", 2, percent=75, speed=1.0))
        await sink.close(timeout_s=30)  # writes the waiting progress at once, without waiting for company
        await asyncio.gather(*tasks, return_exceptions=True)
    assert router.batches == [
        ["v1/progress/1.1-ab/1", "v2/progress/1.1-cd/1", "v2/failed/1.1-cd"],
        ["v1/progress/1.1-ab/2"],
    ]


def sink_on(url: str, client: RouterClient, instance: str) -> EventSink:
    return EventSink(PostgresDatabase(url, events.POSTGRES_SCHEMA, MIGRATIONS, name="outbox"), client, owner=instance)


async def test_instances_sharing_a_database_each_relay_only_their_own_events(database_url: str) -> None:
    router_1, router_2 = RecordingRouter(), RecordingRouter()
    async with router_1.client() as client_1, router_2.client() as client_2:
        one, two = sink_on(database_url, client_1, "i1"), sink_on(database_url, client_2, "i2")
        await one.open()
        await two.open()
        writers = [asyncio.create_task(one.run()), asyncio.create_task(two.run())]
        await two.publish(events.progress("v2", "1.1-cd", 1, percent=5, speed=1.0))  # i2's relay is not running yet
        relays = [asyncio.create_task(one.run_relay())]
        await one.publish(events.progress("v1", "1.1-ab", 1, percent=5, speed=1.0))
        await router_1.until(1)
        relays.append(asyncio.create_task(two.run_relay()))
        await router_2.until(1)
        await one.close(timeout_s=1)
        await two.close(timeout_s=1)
        await asyncio.gather(*writers, *relays, return_exceptions=True)
    assert router_1.ids == ["v1/progress/1.1-ab/1"]
    assert router_2.ids == ["v2/progress/1.1-cd/1"]


async def test_events_are_refused_while_the_server_is_away_and_taken_once_it_is_back() -> None:
    router = RecordingRouter()
    async with stoppable_postgres() as server, router.client() as client:
        await server.stop()
        sink = sink_on(server.url, client, "i1")
        await sink.open()  # the service starts: no crash
        tasks = [asyncio.create_task(sink.run()), asyncio.create_task(sink.run_relay())]
        with pytest.raises(OutboxUnavailable, match="outbox database"):
            await sink.publish(events.progress("v1", "1.1-ab", 1, percent=5, speed=1.0))
        assert "cannot be reached" in (await sink.db.readiness() or "")
        await server.start()
        await sink.publish(events.progress("v1", "1.1-ab", 2, percent=9, speed=1.0))
        await router.until(1)
        assert await sink.db.readiness() is None
        await sink.close(timeout_s=1)
        await asyncio.gather(*tasks, return_exceptions=True)
    assert router.ids == ["v1/progress/1.1-ab/2"]
