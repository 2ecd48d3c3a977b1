"""The outbox and its relay: publish in batches, delete only after the router's 202, back off, stay idle.

Every test runs on SQLite and on PostgreSQL (`database_for`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from router.client import RouterClient, new_event
from services.upload.outbox import MIGRATIONS, POSTGRES_SCHEMA, Outbox
from tests.services.conftest import DatabaseFactory


@pytest.fixture
async def outbox(database_for: DatabaseFactory) -> AsyncIterator[Outbox]:
    box = Outbox(database_for(POSTGRES_SCHEMA, MIGRATIONS, name="upload outbox"))
    await box.open()
    yield box
    await box.close()


async def add(outbox: Outbox, video_id: str) -> None:
    await outbox.begin(video_id)
    event = new_event("cattube.video.uploaded", "cattube/upload", {"video_id": video_id}, id=video_id)
    await outbox.accept(video_id, {"title": video_id}, event)


class Router:
    """A stand-in router: answers each publish with `answer(ids)` and notes when each request came."""

    def __init__(self, answer: Callable[[list[str]], int]) -> None:
        self.answer = answer
        self.requests: list[tuple[float, list[str]]] = []
        self.sequence = 0
        self.published: list[str] = []
        self.changed = asyncio.Event()

    def handle(self, request: httpx.Request) -> httpx.Response:
        ids = [event["id"] for event in json.loads(request.content)]
        self.requests.append((time.monotonic(), ids))
        self.changed.set()
        status = self.answer(ids)
        if status != 202:
            return httpx.Response(status, json={"title": "no", "detail": f"answered {status}"})
        self.published += ids
        results = []
        for event_id in ids:
            self.sequence += 1
            results.append({"id": event_id, "sequence": self.sequence, "duplicate": False})
        return httpx.Response(202, json={"results": results})

    def client(self) -> RouterClient:
        return RouterClient("http://router", transport=httpx.MockTransport(self.handle), retries=0)

    async def until(self, condition: Callable[[], bool], timeout_s: float = 5) -> None:
        """Wait, request by request, until `condition` holds."""
        async with asyncio.timeout(timeout_s):
            while True:
                self.changed.clear()
                if condition():
                    return
                await self.changed.wait()


async def test_pending_events_are_published_in_batches_at_start(outbox: Outbox, router_app: FastAPI) -> None:
    """Rows left by an earlier run go out as soon as the relay starts, in order, `batch_max` at a time."""
    for index in range(5):
        await add(outbox, f"v{index}")
    batches: list[int] = []
    transport = httpx.ASGITransport(app=router_app)
    async with RouterClient("http://router", transport=transport, retries=0) as client:
        await client.ensure_subscription("all", pattern=None, target={"queue": {}}, start="earliest")
        relay = outbox.relay(client, batch_max=2, on_published=batches.append)
        task = asyncio.create_task(relay.run())
        queue = client.queue("all")
        messages = []
        async with asyncio.timeout(5):
            while len(messages) < 5:
                messages += await queue.receive(max_messages=10, wait_s=2)
        relay.stop()
        await task
    assert batches == [2, 2, 1]
    assert [m.event["id"] for m in messages] == ["v0", "v1", "v2", "v3", "v4"]
    assert await outbox.pending_count() == 0
    found = await outbox.get("v4")
    assert found is not None and found["event"]["status"] == "published"
    assert found["event"]["sequence"] == messages[-1].sequence


async def test_backs_off_while_the_router_is_down_and_idles_after(outbox: Outbox) -> None:
    router = Router(lambda ids: 503 if len(router.requests) <= 4 else 202)
    async with router.client() as client:
        relay = outbox.relay(client, backoff_initial_s=0.04, backoff_max_s=0.16)
        task = asyncio.create_task(relay.run())
        await asyncio.sleep(0.05)
        assert router.requests == []  # an empty outbox: no requests at all
        await add(outbox, "v1")
        relay.wake()
        await router.until(lambda: len(router.requests) >= 2)
        for index in range(5):  # new rows during a backoff do not cut it short
            await add(outbox, f"w{index}")
            relay.wake()
        await router.until(lambda: len(router.published) == 6)
        idle_since = len(router.requests)
        await asyncio.sleep(0.3)
        relay.stop()
        await task
    times = [at for at, _ in router.requests]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert len(router.requests) == idle_since == 5
    # Backoffs of 0.04, 0.08, 0.16, 0.16 with "equal jitter": each at least half its ceiling.
    assert all(gap >= ceiling / 2 - 0.005 for gap, ceiling in zip(gaps, [0.04, 0.08, 0.16, 0.16], strict=True))
    assert router.published == ["v1", "w0", "w1", "w2", "w3", "w4"]
    assert await outbox.pending_count() == 0


async def test_an_event_the_router_refuses_is_set_aside(outbox: Outbox) -> None:
    router = Router(lambda ids: 422 if "bad" in ids else 202)
    for video_id in ("a", "bad", "c"):
        await add(outbox, video_id)
    async with router.client() as client:
        relay = outbox.relay(client)
        task = asyncio.create_task(relay.run())
        await router.until(lambda: len(router.requests) == 4)
        relay.stop()
        await task
    assert router.published == ["a", "c"]
    assert [ids for _, ids in router.requests] == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    refused = await outbox.get("bad")
    assert refused is not None and refused["event"]["status"] == "refused"
    assert "422" in refused["event"]["error"]
    assert await outbox.pending_count() == 0


async def test_a_wrong_token_is_retried_not_dropped(outbox: Outbox) -> None:
    router = Router(lambda ids: 401)
    await add(outbox, "v1")
    async with router.client() as client:
        relay = outbox.relay(client, backoff_initial_s=0.01, backoff_max_s=0.02)
        task = asyncio.create_task(relay.run())
        await router.until(lambda: len(router.requests) >= 3)
        relay.stop()
        await task
    assert await outbox.pending_count() == 1
    assert relay.failures >= 3 and relay.last_error is not None and "401" in relay.last_error


async def test_the_sweep_takes_only_this_replica_s_uploads_from_before_it_started(
    database_for: DatabaseFactory,
) -> None:
    """Replicas share the uploads table on PostgreSQL: one that restarts sweeps what it was receiving, nothing else."""
    earlier = Outbox(database_for(POSTGRES_SCHEMA, MIGRATIONS), owner="upload-a")
    await earlier.open()
    await earlier.begin("cut-short")  # this replica crashed while receiving it
    await earlier.close()
    other = Outbox(database_for(POSTGRES_SCHEMA, MIGRATIONS), owner="upload-b")
    await other.open()
    await other.begin("theirs")
    await other.close()
    again = Outbox(database_for(POSTGRES_SCHEMA, MIGRATIONS), owner="upload-a")
    await again.open()
    try:
        await again.begin("arriving-now")  # begun after this start: a live upload, whenever the sweep runs
        assert await again.unfinished() == ["cut-short"]
    finally:
        await again.close()
