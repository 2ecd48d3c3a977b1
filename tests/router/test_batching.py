"""Group commit: one item the store refuses fails alone, never the publishes that shared its transaction."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from router.batching import GroupCommit
from router.cloudevents import Encoded
from router.persistence import Appended
from services.common.errors import Unavailable
from tests.router.events import STRUCTURED, event


async def test_a_failing_item_fails_alone_and_the_rest_of_its_commit_succeeds() -> None:
    commits: list[list[str]] = []

    async def commit(items: list[str]) -> list[str]:
        commits.append(items)
        if "poison" in items:  # the whole transaction fails, as SQLite's does
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return [f"stored {item}" for item in items]

    writer: GroupCommit[str, str] = GroupCommit("test", commit)
    items = ["a", "b", "poison", "c"]
    # Submitted before the loop runs, so all four share one commit.
    waiting = [asyncio.ensure_future(writer.submit(item)) for item in items]
    await asyncio.sleep(0)
    runner = asyncio.create_task(writer.run())
    results = await asyncio.gather(*waiting, return_exceptions=True)
    writer.stop()
    await runner
    assert commits[0] == items
    assert results[:2] == ["stored a", "stored b"] and results[3] == "stored c"
    assert isinstance(results[2], Unavailable) and "too large" in str(results[2])


async def test_a_poisoned_publish_fails_alone_among_concurrent_ones(
    router_app: FastAPI, router: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event that passed validation but that the store refuses (injected here) takes no one down with it."""
    bus = router_app.state.bus
    store_append = bus.store.append
    released, everyone_queued = asyncio.Event(), asyncio.Event()

    async def append(events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        ids = [e.event["id"] for e in events]
        if ids == ["gate"]:
            await released.wait()  # hold the writer so that every publish below queues behind it
        if "poison" in ids:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        appended: list[Appended] = await store_append(events, now_ms)
        return appended

    monkeypatch.setattr(bus.store, "append", append)
    submit, submitted = bus._writer.submit, 0
    ids = [f"good{i}" for i in range(10)] + ["poison"] + [f"good{i}" for i in range(10, 20)]

    async def counting_submit(item: Any) -> Any:
        nonlocal submitted
        submitted += 1
        if submitted == 1 + len(ids):
            everyone_queued.set()
        return await submit(item)

    monkeypatch.setattr(bus._writer, "submit", counting_submit)

    async def release() -> None:
        await everyone_queued.wait()
        released.set()

    releaser = asyncio.create_task(release())
    gate = asyncio.create_task(router.post("/events", json=event(id="gate"), headers=STRUCTURED))
    responses = await asyncio.gather(
        *(router.post("/events", content=json.dumps(event(id=i)), headers=STRUCTURED) for i in ids)
    )
    await releaser
    assert (await gate).status_code == 202
    statuses = {i: r.status_code for i, r in zip(ids, responses, strict=True)}
    assert statuses.pop("poison") == 503
    assert set(statuses.values()) == {202}
