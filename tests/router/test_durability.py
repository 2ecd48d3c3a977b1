"""Durability modes (`CATTUBE_ROUTER_DURABILITY`): `fsync` answers what is on disk, `batched` syncs within a second.

On SQLite the store's connection stays at `synchronous=NORMAL` and the WAL is synced with an explicit
fdatasync (`router.stores.sqlite.durability.sync_file`), which these tests replace by one they watch and hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from router.app import create_app
from router.bus import Bus
from router.cloudevents import Encoded
from router.fanout import Fanout
from router.persistence import Delivery, EventStore, SubscriptionSpec
from router.settings import RouterSettings
from router.stores import store_factory
from router.stores.postgres import PostgresEventStore
from router.stores.sqlite import SQLiteEventStore, core, durability
from tests.conftest import running
from tests.router.events import BATCH, STRUCTURED, event


def test_fsync_is_the_default_and_batched_can_be_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RouterSettings().durability == "fsync"
    monkeypatch.setenv("CATTUBE_ROUTER_DURABILITY", "batched")
    assert RouterSettings().durability == "batched"


def test_the_deprecated_sqlite_setting_still_means_what_it_did(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATTUBE_SQLITE_SYNCHRONOUS", "NORMAL")
    assert RouterSettings().durability == "batched"
    monkeypatch.setenv("CATTUBE_SQLITE_SYNCHRONOUS", "FULL")
    assert RouterSettings().durability == "fsync"
    monkeypatch.setenv("CATTUBE_ROUTER_DURABILITY", "batched")  # the new name wins
    assert RouterSettings().durability == "batched"


@pytest.mark.parametrize("value", ["FULL", "fsync ", "everysec", "1"])
def test_a_bad_durability_is_refused_at_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CATTUBE_ROUTER_DURABILITY", value)
    with pytest.raises(ValidationError, match="CATTUBE_ROUTER_DURABILITY: expected fsync .* or batched"):
        RouterSettings()


@asynccontextmanager
async def running_bus(store: EventStore) -> AsyncIterator[Bus]:
    """A bus over `store` with its group-commit writer running, stopped and closed on the way out."""
    bus = Bus(store, retention_s=3600)
    await bus.start()
    writer = asyncio.create_task(bus.run_writer())
    try:
        yield bus
    finally:
        bus.stop()
        await writer
        await bus.close()


def encoded(event: dict[str, Any]) -> Encoded:
    """An event as the bus takes it: the event and its JSON."""
    return Encoded(event, json.dumps(event).encode())


class HeldSync:
    """Stands in for the WAL's fdatasync: records which file each call synced and holds it until released."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self.release.set()

    def __call__(self, fd: int) -> None:
        self.files.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.started.release()
        assert self.release.wait(30), "a sync held for 30 s"

    async def next_call(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, True, 30), "no fdatasync of the WAL came"


@pytest.fixture
def held_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldSync]:
    held = HeldSync()
    monkeypatch.setattr(durability, "sync_file", held)
    yield held
    held.release.set()


@pytest.mark.sqlite
async def test_fsync_mode_answers_a_publish_and_an_ack_only_after_the_wal_is_synced(
    router_settings: Callable[..., RouterSettings], held_sync: HeldSync
) -> None:
    settings = router_settings()
    app = create_app(settings)
    async with running(app) as router:
        bus: Bus = app.state.bus
        store = bus.store
        assert isinstance(store, SQLiteEventStore)
        # One level for every transaction: no PRAGMA switch per commit.
        assert store.conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        await router.put("/subscriptions/q", json={"pattern": None, "target": {"queue": {}}})
        await held_sync.next_call()  # the subscription's own commit is synced too

        held_sync.release.clear()
        publish = asyncio.create_task(router.post("/events", json=event(), headers=STRUCTURED))
        await held_sync.next_call()
        assert held_sync.files[-1] == f"{settings.bus_file}-wal"
        await asyncio.sleep(0.05)
        assert not publish.done(), "a 202 before the WAL reached the disk"
        held_sync.release.set()
        assert (await publish).status_code == 202

        (message,) = (await router.post("/subscriptions/q/receive", json={"max_messages": 1})).json()["messages"]
        held_sync.release.clear()
        ack = asyncio.create_task(router.post("/subscriptions/q/ack", json={"receipts": [message["receipt"]]}))
        await held_sync.next_call()
        await asyncio.sleep(0.05)
        assert not ack.done(), "an ack answered before the WAL reached the disk"
        held_sync.release.set()
        assert (await ack).json()["results"][0]["ok"] is True


@pytest.mark.sqlite
async def test_one_fdatasync_answers_every_commit_made_before_it_started(held_sync: HeldSync, tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "bus.db")
    async with running_bus(store) as bus:
        await bus.publish([encoded(event(id="first"))])
        before = len(held_sync.files)
        held_sync.release.clear()
        first = asyncio.create_task(bus.publish([encoded(event(id="a"))]))
        await held_sync.next_call()  # the first commit's sync is under way (held): the others commit meanwhile
        others = [asyncio.create_task(bus.publish([encoded(event(id=f"b{n}"))])) for n in range(8)]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in [first, *others])
        held_sync.release.set()
        await asyncio.gather(first, *others)
        assert len(held_sync.files) - before == 2, "one fdatasync for the first commit, one for all that followed"


@pytest.mark.sqlite
async def test_batched_mode_syncs_within_the_bound_and_not_while_idle(held_sync: HeldSync, tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "bus.db", durability="batched")
    async with running_bus(store) as bus:
        loop = asyncio.get_running_loop()
        calls = len(held_sync.files)
        await bus.publish([encoded(event(id="a"))])
        assert len(held_sync.files) == calls, "batched mode answered after an fsync of its own"
        due = store.sync_due_at()
        assert due is not None and due - loop.time() <= 1.0, "no sync scheduled within a second of the commit"
        await held_sync.next_call()
        assert held_sync.files[-1] == str(tmp_path / "bus.db-wal")
        await asyncio.sleep(0.01)  # the sync's answer reaches the loop
        assert store.sync_due_at() is None, "a sync scheduled with nothing to sync"
        await asyncio.sleep(durability.SYNC_DELAY_S * 2)
        assert len(held_sync.files) == calls + 1, "a sync ran while idle"


@pytest.mark.sqlite
async def test_acks_of_concurrent_requests_share_one_transaction_and_a_failing_one_fails_alone(
    router_settings: Callable[..., RouterSettings], held_sync: HeldSync, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(router_settings())
    async with running(app) as router:
        store = app.state.bus.store
        assert isinstance(store, SQLiteEventStore)
        await router.put("/subscriptions/q", json={"pattern": None, "target": {"queue": {}}})
        events = [event(id=f"e{n}") for n in range(10)]
        assert (await router.post("/events", content=json.dumps(events), headers=BATCH)).status_code == 202
        messages = (await router.post("/subscriptions/q/receive", json={"max_messages": 10})).json()["messages"]
        receipts = [m["receipt"] for m in messages]
        assert len(receipts) == 10

        async def ack_concurrently(receipts: list[str]) -> list[httpx.Response]:
            held_sync.release.clear()
            first = asyncio.create_task(router.post("/subscriptions/q/ack", json={"receipts": receipts[:1]}))
            await held_sync.next_call()  # the first ack's sync is held: the others queue up behind it meanwhile
            rest = [
                asyncio.create_task(router.post("/subscriptions/q/ack", json={"receipts": [r]})) for r in receipts[1:]
            ]
            await asyncio.sleep(0.2)
            held_sync.release.set()
            return [await first, *(await asyncio.gather(*rest))]

        commits = store._commits
        answers = await ack_concurrently(receipts[:5])
        assert [a.json()["results"][0]["ok"] for a in answers] == [True] * 5
        assert store._commits - commits == 2, "the four acks that queued up meanwhile were not committed together"

        poisoned = receipts[7]
        ack_in = store._ack_in

        def failing_ack(conn: sqlite3.Connection, name: str, receipts: Any) -> Any:
            if poisoned in receipts:
                raise sqlite3.OperationalError("this receipt cannot be acked")
            return ack_in(conn, name, receipts)

        monkeypatch.setattr(store, "_ack_in", failing_ack)
        answers = await ack_concurrently(receipts[5:])
        statuses = {receipts[5 + n]: answer.status_code for n, answer in enumerate(answers)}
        assert statuses.pop(poisoned) == 503
        assert set(statuses.values()) == {200}
        assert all(a.json()["results"][0]["ok"] for a in answers if a.status_code == 200)
        assert (await router.get("/subscriptions/q/stats")).json()["in_flight"] == 1


@pytest.mark.parametrize(("mode", "expected"), [("fsync", "on"), ("batched", "off")])
async def test_postgresql_commits_wait_for_the_flush_only_in_fsync_mode(
    database_url: str, tmp_path: Path, mode: str, expected: str
) -> None:
    settings = RouterSettings(data_dir=tmp_path, router_database_url=database_url, router_durability=mode)
    store, notifier = store_factory(settings)()
    assert isinstance(store, PostgresEventStore)
    await store.open(notifier, Fanout())
    try:
        async with store._connection() as conn:  # the sessions of durable writes: events, acks, subscriptions
            assert await conn.fetchval("SHOW synchronous_commit") == expected
        async with store._connection(bookkeeping=True) as conn:  # leases and push outcomes never wait for it
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
    finally:
        await store.close()


@pytest.mark.sqlite
@pytest.mark.parametrize("mode", ["fsync", "batched"])
async def test_small_appends_commit_on_the_loop_and_big_ones_on_the_stores_thread(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteEventStore(tmp_path / "bus.db", durability=mode)  # type: ignore[arg-type]
    async with running_bus(store) as bus:
        threads: list[str] = []
        append = store._append

        def watched(events: Any, now_ms: int) -> Any:
            threads.append(threading.current_thread().name)
            return append(events, now_ms)

        monkeypatch.setattr(store, "_append", watched)
        one = [encoded(event(id="one"))]
        await bus.publish(one)
        many = [encoded(event(id=f"m{n}")) for n in range(core.INLINE_APPEND_EVENTS + 1)]
        await bus.publish(many)
        big = event(id="big", data="x" * core.INLINE_APPEND_BYTES)
        await bus.publish([encoded(big)])
        assert threads[0] == threading.current_thread().name, "one event did not commit inline on the loop"
        assert all(name.startswith("router-sqlite_") for name in threads[1:]), threads
        assert store._wal_sync.synced == store._wal_sync.committed or mode == "batched"


@pytest.mark.sqlite
async def test_a_failed_fdatasync_fails_what_waited_for_it_and_the_next_sync_answers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteEventStore(tmp_path / "bus.db")
    async with running_bus(store) as bus:
        failing = False

        def sync(fd: int) -> None:
            if failing:
                raise OSError(5, "Input/output error")
            os.fdatasync(fd)

        monkeypatch.setattr(durability, "sync_file", sync)
        await store.put_subscription(SubscriptionSpec("q", None, None, {"queue": {}}, Delivery()), 0)
        failing = True
        with pytest.raises(Exception, match="Input/output error"):
            await bus.publish([encoded(event(id="a"))])
        assert store.write_failure == "cannot write: Input/output error"
        failing = False
        # A receive commits nothing durable of its own but may read "a": it waits for a sync that covers it.
        (message,) = await asyncio.wait_for(store.receive("q", 10, 30_000, int(time.time() * 1000) + 1000, 5), 30)
        assert json.loads(message.event)["id"] == "a"
        (appended,) = await bus.publish([encoded(event(id="b"))])
        assert not appended.duplicate
        assert store._wal_sync.synced == store._wal_sync.committed
