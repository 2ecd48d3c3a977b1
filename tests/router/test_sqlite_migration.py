"""A bus file written by a router from before the storage seam opens, keeps its data, and works."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from router.fanout import Fanout
from router.notifier import InProcessNotifier
from router.persistence import Delivery, SubscriptionSpec, spec_to_json
from router.stores.sqlite import SQLiteEventStore
from tests.router.test_store_contract import T0, ev, queue

pytestmark = pytest.mark.sqlite

BEFORE_THE_SEAM = """
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, id TEXT NOT NULL,
    type TEXT NOT NULL, partitionkey TEXT, appended_at INTEGER NOT NULL, body BLOB NOT NULL, UNIQUE (source, id));
CREATE TABLE subscriptions (name TEXT PRIMARY KEY, spec TEXT NOT NULL, secret TEXT NOT NULL,
    created_at INTEGER NOT NULL, start_seq INTEGER NOT NULL, delivered_total INTEGER NOT NULL DEFAULT 0,
    failed_total INTEGER NOT NULL DEFAULT 0);
CREATE TABLE messages (msg_id INTEGER PRIMARY KEY AUTOINCREMENT, sub TEXT NOT NULL, seq INTEGER NOT NULL,
    pkey TEXT, replay TEXT, enqueued_at INTEGER NOT NULL, visible_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, receipt TEXT, last_error TEXT);
"""


async def test_an_old_bus_file_opens_and_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    old = sqlite3.connect(path)
    old.executescript(BEFORE_THE_SEAM)
    spec = SubscriptionSpec("q", None, None, {"queue": {}}, Delivery())
    old.execute(
        "INSERT INTO subscriptions (name, spec, secret, created_at, start_seq) VALUES ('q', ?, 'whsec_x', ?, 1)",
        (spec_to_json(spec), T0),
    )
    old.execute(
        "INSERT INTO events (source, id, type, appended_at, body) VALUES ('contract', 'old', 't', ?, ?)",
        (T0, ev("old")[1]),
    )
    old.execute("INSERT INTO messages (sub, seq, enqueued_at, visible_at) VALUES ('q', 1, ?, ?)", (T0, T0))
    old.commit()
    old.close()
    store = SQLiteEventStore(path)
    await store.open(InProcessNotifier(), Fanout())
    try:
        await store.append([ev("new")], T0)  # fanned out to the subscription the old router made
        messages = await store.receive("q", 10, 1000, T0, 5)
        assert [m.sequence for m in messages] == [1, 2]
        assert all(r.ok for r in await store.ack("q", [m.receipt for m in messages], T0))
        assert (await store.stats("q", T0)).changes > 0
        await store.put_subscription(queue("another"), T0)
        assert [s.spec.name for s in (await store.load_subscriptions())[1]] == ["another", "q"]
    finally:
        await store.close()
