"""The autoscaler's history with several processing instances: each reports its own workers, the store sums the fleet.

Every instance publishes `cattube.processing.scaled` for its own workers; the backlog it reports is
the queue's (the same for every instance). The history keeps each change with its instance and the
fleet (the sum over instances) after it, whatever order the changes arrive in.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from services.common.db import SQLiteDatabase
from services.common.outbox import OUTBOX
from services.store.catalog import Catalog, Outcome
from services.store.tables import CATALOG, POSTGRES_SCHEMA
from tests.services.conftest import DatabaseFactory
from tests.services.store.conftest import event

# (instance, from, to, backlog) at 10:00:00, :01, ...: two machines on one queue, their changes interleaved.
INTERLEAVED = [
    ("mittens", 0, 2, 2),
    ("whiskers", 0, 1, 3),
    ("mittens", 2, 3, 4),
    ("whiskers", 1, 2, 4),
    ("whiskers", 2, 0, 1),
    ("mittens", 3, 1, 0),
]
FLEET = [2, 3, 4, 5, 3, 1]


def scaled(n: int, instance: str | None, before: int, after: int, backlog: int) -> dict[str, Any]:
    data: dict[str, Any] = {"from": before, "to": after, "backlog": backlog, "in_flight": 0, "reason": "queue"}
    if instance is not None:
        data["instance"] = instance
    at = f"2026-11-28T10:00:{n:02d}Z"
    return event("cattube.processing.scaled", data, id=f"scaled/{instance}/s/{n}", time=at)


@pytest.fixture
def make_catalog(database_for: DatabaseFactory) -> Callable[..., Any]:
    """A catalog on this test's engine: each test that uses it runs on SQLite and on PostgreSQL."""

    @asynccontextmanager
    async def make(history_size: int = 100) -> AsyncIterator[Catalog]:
        db = database_for(POSTGRES_SCHEMA, [CATALOG, OUTBOX], name="catalog")
        await db.open()
        try:
            yield Catalog(db, public_url="http://store", history_size=history_size)
        finally:
            await db.close()

    return make


async def test_the_fleet_is_the_sum_over_instances_at_each_change(make_catalog: Callable[..., Any]) -> None:
    async with make_catalog() as catalog:
        live: list[int | None] = []
        for n, step in enumerate(INTERLEAVED):
            outcome: Outcome = await catalog.apply(scaled(n, *step))
            assert outcome.scaled is not None
            live.append(outcome.scaled.fleet)
        assert live == FLEET  # what the page's live stream carries with each change
        history = await catalog.scaling_history(100)
    assert [(p.instance, p.from_, p.to, p.backlog) for p in history.points] == INTERLEAVED
    assert [p.fleet for p in history.points] == FLEET
    assert history.fleet == 1
    assert [(i.instance, i.workers) for i in history.instances] == [("mittens", 1), ("whiskers", 0)]
    record = history.points[1].record()
    assert (record["instance"], record["from"], record["to"], record["fleet"]) == ("whiskers", 0, 1, 3)


async def test_changes_arriving_out_of_order_give_the_same_fleet(make_catalog: Callable[..., Any]) -> None:
    events = [scaled(n, *step) for n, step in enumerate(INTERLEAVED)]
    random.Random(12).shuffle(events)
    async with make_catalog() as catalog:
        for e in events:
            await catalog.apply(e)
        history = await catalog.scaling_history(100)
    assert [(p.instance, p.to) for p in history.points] == [(i, to) for i, _, to, _ in INTERLEAVED]
    assert [p.fleet for p in history.points] == FLEET
    assert [(i.instance, i.workers) for i in history.instances] == [("mittens", 1), ("whiskers", 0)]


async def test_changes_without_an_instance_count_as_one_unnamed_instance(make_catalog: Callable[..., Any]) -> None:
    async with make_catalog() as catalog:
        await catalog.apply(scaled(0, None, 0, 2, 2))  # from a processing service older than instances
        await catalog.apply(scaled(1, "mittens", 0, 1, 3))
        await catalog.apply(scaled(2, None, 2, 3, 4))
        history = await catalog.scaling_history(100)
    assert [(p.instance, p.fleet) for p in history.points] == [("", 2), ("mittens", 3), ("", 4)]
    assert [p.record()["instance"] for p in history.points] == [None, "mittens", None]
    assert [(i.instance, i.workers) for i in history.instances] == [("", 3), ("mittens", 1)]


async def test_a_stopped_instance_stops_counting_and_a_steady_one_keeps_counting(
    make_catalog: Callable[..., Any],
) -> None:
    async with make_catalog(history_size=3) as catalog:
        await catalog.apply(scaled(0, "steady", 0, 2, 0))  # min_workers 2: it never changes again
        await catalog.apply(scaled(1, "gone", 0, 3, 3))
        await catalog.apply(scaled(2, "gone", 3, 0, 0))  # stopped, and quiet from now on
        for n, (before, after) in enumerate([(0, 1), (1, 2), (2, 1)], start=3):
            await catalog.apply(scaled(n, "busy", before, after, after))
        history = await catalog.scaling_history(100)
    # Only the busy instance's changes are still kept; the steady one's 2 workers still count.
    assert [(p.instance, p.to, p.fleet) for p in history.points] == [("busy", 1, 3), ("busy", 2, 4), ("busy", 1, 3)]
    assert [(i.instance, i.workers) for i in history.instances] == [("busy", 1), ("steady", 2)]
    assert history.fleet == 3


async def test_a_window_starts_from_each_instance_count_before_it(make_catalog: Callable[..., Any]) -> None:
    async with make_catalog() as catalog:
        for n, step in enumerate(INTERLEAVED):
            await catalog.apply(scaled(n, *step))
        window = await catalog.scaling_history(3)  # the last three: whiskers 1->2, whiskers 2->0, mittens 3->1
    assert [p.fleet for p in window.points] == FLEET[-3:]


async def test_a_history_from_before_instances_opens_as_one_unnamed_instance(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE scaling (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, from_workers INTEGER NOT NULL,"
        " to_workers INTEGER NOT NULL, backlog INTEGER NOT NULL, in_flight INTEGER NOT NULL, reason TEXT NOT NULL);"
        "INSERT INTO scaling (at, from_workers, to_workers, backlog, in_flight, reason) VALUES (1.0, 0, 2, 2, 0, 'q');"
    )
    conn.commit()
    conn.close()
    db = SQLiteDatabase(path, [CATALOG, OUTBOX], name="catalog")  # a SQLite file from before: adopted
    await db.open()
    try:
        catalog = Catalog(db, public_url="http://store")
        await catalog.apply(scaled(0, "mittens", 0, 1, 3))
        history = await catalog.scaling_history(100)
    finally:
        await db.close()
    assert [(p.instance, p.to, p.fleet) for p in history.points] == [("", 2, 2), ("mittens", 1, 3)]
    assert json.dumps(history.points[0].record())  # still a plain JSON record


async def test_the_history_api_names_each_instance_and_the_fleet(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        for n, step in enumerate(INTERLEAVED):
            await store.deliver(scaled(n, *step))
        body = (await store.api.get("/autoscaler/history")).json()
        window = (await store.api.get("/autoscaler/history", params={"limit": 2})).json()
    items = body["items"]
    # What clients before instances read is all still there: each change of one instance's workers.
    assert [(p["instance"], p["from"], p["to"], p["backlog"]) for p in items] == INTERLEAVED
    assert [p["fleet"] for p in items] == FLEET
    assert body["instances"] == [
        {"instance": "mittens", "workers": 1, "at": "2026-11-28T10:00:05.000Z"},
        {"instance": "whiskers", "workers": 0, "at": "2026-11-28T10:00:04.000Z"},
    ]
    assert body["fleet"] == 1
    assert [p["fleet"] for p in window["items"]] == FLEET[-2:]
    assert [i["instance"] for i in window["instances"]] == ["mittens", "whiskers"]
