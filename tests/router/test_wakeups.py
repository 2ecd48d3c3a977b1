"""Waking only the receivers needed: waiting receives of a subscription queue in line (FIFO), and a commit
that makes messages ready wakes one of them, who wakes the next when it leaves some behind (router.signals).
Before, every waiting receive woke on every change and each ran a lease query that mostly found nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from router.bus import Bus
from router.persistence import Message
from tests.router.events import BATCH, event

pytestmark = pytest.mark.engines  # CI runs these on PostgreSQL too (scripts/check)


class Leases:
    """Counts the store's lease queries for receives (wrapping `store.receive`), and lets a test wait for a count."""

    def __init__(self, bus: Bus) -> None:
        self.calls = 0
        self._counted = asyncio.Condition()
        self._original: Callable[..., Awaitable[list[Message]]] = bus.store.receive
        bus.store.receive = self._counted_receive  # type: ignore[method-assign]

    async def _counted_receive(self, *args: Any, **kwargs: Any) -> list[Message]:
        try:
            return await self._original(*args, **kwargs)
        finally:
            async with self._counted:
                self.calls += 1
                self._counted.notify_all()

    async def reached(self, count: int) -> None:
        async with asyncio.timeout(10), self._counted:
            await self._counted.wait_for(lambda: self.calls >= count)


async def publish(router: httpx.AsyncClient, *events: dict[str, Any]) -> None:
    response = await router.post("/events", content=json.dumps(list(events)), headers=BATCH)
    assert response.status_code == 202, response.text


async def make_queue(router: httpx.AsyncClient, name: str = "q", **delivery: Any) -> None:
    response = await router.put(
        f"/subscriptions/{name}", json={"pattern": None, "target": {"queue": {}}, "delivery": delivery}
    )
    assert response.status_code in (200, 201), response.text


async def test_one_publish_with_ten_waiting_receives_runs_one_lease_query(
    router_app: FastAPI, router: httpx.AsyncClient
) -> None:
    bus: Bus = router_app.state.bus
    await make_queue(router)
    leases = Leases(bus)
    receives = [
        asyncio.create_task(router.post("/subscriptions/q/receive", json={"max_messages": 10, "wait_s": 20}))
        for _ in range(10)
    ]
    await leases.reached(10)  # each read once, then waits in line
    assert bus.signals["q"].waiting == 10
    await publish(router, event(id="one"))
    done, _ = await asyncio.wait(receives, return_when=asyncio.FIRST_COMPLETED)
    (winner,) = done
    assert [m["event"]["id"] for m in winner.result().json()["messages"]] == ["one"]
    # One lease query for one ready message, not one per waiting receive. (A receiver that fills its batch
    # wakes the next, which may find nothing: the notifier says that messages are ready, not how many.)
    assert (leases.calls, bus.signals["q"].waiting) == (11, 9)
    bus.stop()  # shutdown wakes every one of them at once
    answers = await asyncio.gather(*receives)
    assert [a.json()["messages"] for a in answers if a is not winner.result()] == [[]] * 9


async def test_a_receiver_that_leaves_messages_behind_wakes_the_next(
    router_app: FastAPI, router: httpx.AsyncClient
) -> None:
    bus: Bus = router_app.state.bus
    await make_queue(router)
    leases = Leases(bus)
    receives = [
        asyncio.create_task(router.post("/subscriptions/q/receive", json={"max_messages": 2, "wait_s": 20}))
        for _ in range(4)
    ]
    await leases.reached(4)
    await publish(router, *[event(id=f"e{i}") for i in range(5)])  # one commit, five ready messages
    await leases.reached(7)  # 2 + 2 + 1: each full batch woke the next
    assert bus.signals["q"].waiting == 1
    bus.stop()
    got = [m["event"]["id"] for r in await asyncio.gather(*receives) for m in r.json()["messages"]]
    assert sorted(got) == [f"e{i}" for i in range(5)]


async def test_no_wake_up_is_lost_under_concurrent_publishes(router_app: FastAPI, router: httpx.AsyncClient) -> None:
    """Many waiters, many concurrent commits: every message is received exactly once, with no receive ever
    timing out while a message waits (long polls of 20 s; a lost wake-up would hang the test)."""
    await make_queue(router)
    total = 300
    seen: list[str] = []
    finished = asyncio.Event()

    async def consume(max_messages: int) -> None:
        while not finished.is_set():
            response = await router.post("/subscriptions/q/receive", json={"max_messages": max_messages, "wait_s": 20})
            messages = response.json()["messages"]
            if messages:
                seen.extend(m["event"]["id"] for m in messages)
                acked = await router.post("/subscriptions/q/ack", json={"receipts": [m["receipt"] for m in messages]})
                assert all(r["ok"] for r in acked.json()["results"])
            if len(seen) >= total:
                finished.set()

    leases = Leases(router_app.state.bus)
    consumers = [asyncio.create_task(consume(1 + i % 3)) for i in range(12)]
    await leases.reached(12)
    batches = [[event(id=f"m{b}-{i}") for i in range(1 + b % 5)] for b in range(100)]
    assert sum(map(len, batches)) == total
    await asyncio.gather(*(publish(router, *batch) for batch in batches))
    async with asyncio.timeout(15):  # far beyond what the work needs; only a lost wake-up would reach it
        await finished.wait()
    router_app.state.bus.stop()
    await asyncio.gather(*consumers)
    assert sorted(seen) == sorted(e["id"] for batch in batches for e in batch)


async def test_a_new_queues_sync_after_a_publish_wakes_no_waiter(
    router_app: FastAPI, router: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bus syncs a new subscription in the background, with a first look for its hidden messages. That
    look-up can answer after a publish with the publish's message (hidden beyond a `now` taken before it), and a
    timer set for that moment, past already, would wake every waiter at once where the publish woke one (CI saw
    this module's counts go wrong so). Here the look-up answers only after the publish, and leases wait for the
    sync."""
    bus: Bus = router_app.state.bus
    published = asyncio.Event()
    synced = asyncio.Event()
    look_up = bus.store.next_visible_ms

    async def look_up_after_the_publish(name: str, now_ms: int) -> int | None:
        await published.wait()
        return await look_up(name, now_ms)

    monkeypatch.setattr(bus.store, "next_visible_ms", look_up_after_the_publish)
    await make_queue(router)
    syncing = bus._syncing  # the sync the PUT's commit started
    assert syncing is not None
    leases = Leases(bus)
    receives = [
        asyncio.create_task(router.post("/subscriptions/q/receive", json={"max_messages": 10, "wait_s": 20}))
        for _ in range(3)
    ]
    await leases.reached(3)
    lease = bus.store.receive
    reads = 0

    async def lease_after_the_sync(*args: Any, **kwargs: Any) -> list[Message]:
        nonlocal reads
        reads += 1
        await synced.wait()
        return await lease(*args, **kwargs)

    monkeypatch.setattr(bus.store, "receive", lease_after_the_sync)
    await publish(router, event(id="one"))
    published.set()
    await asyncio.wait({syncing})
    await asyncio.sleep(0.05)  # a timer the sync set, due at once, fires before this ends
    assert reads == 1  # the publish woke one receiver to read, and nothing woke the others
    synced.set()
    done, _ = await asyncio.wait(receives, return_when=asyncio.FIRST_COMPLETED)
    (winner,) = done
    assert [m["event"]["id"] for m in winner.result().json()["messages"]] == ["one"]
    bus.stop()
    await asyncio.gather(*receives)
