"""A router whose disk is full says so: publishes get 507, `/readyz` fails until a commit succeeds again.

The full disk is SQLite's own: `PRAGMA max_page_count` at the database's current size makes every
commit that needs a new page fail with SQLITE_FULL, exactly as a full disk does, without one.
"""

from __future__ import annotations

import errno
import json
import sqlite3

import httpx
import pytest
from fastapi import FastAPI

from router.stores.sqlite import SQLiteEventStore, durability
from router.stores.sqlite.core import storage_failure
from tests.router.events import BATCH, event

pytestmark = pytest.mark.sqlite


async def set_max_pages(app: FastAPI, pages: int | None) -> None:
    store: SQLiteEventStore = app.state.bus.store

    def limit() -> None:
        (current,) = store.conn.execute("PRAGMA page_count").fetchone()
        store.conn.execute(f"PRAGMA max_page_count={current if pages is None else pages}")

    await store._run(limit)


def big_batch(prefix: str) -> str:
    return json.dumps([event(id=f"{prefix}{i}", data={"pad": "x" * 100_000}) for i in range(5)])


async def test_publishing_on_a_full_disk_gets_507_and_readyz_fails_until_a_commit_succeeds(
    router_app: FastAPI, router: httpx.AsyncClient
) -> None:
    assert (await router.get("/readyz")).status_code == 200
    await set_max_pages(router_app, None)  # the disk is full from here on

    refused = await router.post("/events", content=big_batch("a"), headers=BATCH)
    assert refused.status_code == 507
    assert refused.headers["content-type"] == "application/problem+json"
    assert "disk is full" in refused.json()["detail"]
    ready = await router.get("/readyz")
    assert ready.status_code == 503 and "disk is full" in ready.json()["detail"]

    await set_max_pages(router_app, 1_000_000)  # space again
    assert (await router.get("/readyz")).status_code == 503  # nothing has committed yet
    accepted = await router.post("/events", content=big_batch("b"), headers=BATCH)
    assert accepted.status_code == 202
    assert (await router.get("/readyz")).status_code == 200
    # Nothing of the refused publish was kept.
    await router.put("/subscriptions/all", json={"pattern": None, "target": {"queue": {}}, "start": "earliest"})
    messages = (await router.post("/subscriptions/all/receive", json={"max_messages": 10})).json()["messages"]
    assert sorted(m["event"]["id"] for m in messages) == [f"b{i}" for i in range(5)]


async def test_a_failed_sync_after_commit_gets_507_saying_to_publish_again_not_that_nothing_was_written(
    router_app: FastAPI, router: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(durability, "sync_file", failing_sync)
    refused = await router.post("/events", content=big_batch("a"), headers=BATCH)
    assert refused.status_code == 507
    detail = refused.json()["detail"]
    # The rows were committed before the sync failed: "nothing was written" would be false.
    assert "nothing was written" not in detail
    assert "publish them again" in detail and "Input/output error" in detail

    monkeypatch.setattr(durability, "sync_file", durability.os.fdatasync)
    again = await router.post("/events", content=big_batch("a"), headers=BATCH)
    assert again.status_code == 202
    assert all(r["duplicate"] for r in again.json()["results"]), "committed once, recognised the second time"


def test_what_counts_as_running_out_of_storage() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert storage_failure(full) == "the disk is full (SQLITE_FULL)"
    assert storage_failure(OSError(errno.ENOSPC, "No space left on device")) == "cannot write: No space left on device"
    assert storage_failure(sqlite3.IntegrityError("UNIQUE constraint failed")) is None
    assert storage_failure(ValueError("bad event")) is None
