"""The store's outbox: events recorded in the catalog's own transaction, published when the router takes them.

    outbox.enqueue(conn, event)        # inside the transaction that changes the catalog
    relay = OutboxRelay(db, router)    # run() publishes in order, in batches, with backoff
    relay.wake()                       # after the transaction commits: there is something to send

A video becomes ready and its `cattube.video.ready` is owed in the same commit, so neither can
happen without the other, and the store keeps working while the router is down: the events wait
here (on disk) and go out, in the order they were recorded, once it is back. Every event has a
fixed id, so a batch published twice (the answer was lost) is recognized by the router as the
same events. An event the router refuses as malformed (400, 413, 422) is set aside with the
reason, logged, and never blocks the ones behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from router.client import RouterClient, RouterError
from services.store.database import Database

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    refused_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (refused_at, seq);
"""

BATCH_MAX = 50
REFUSED_STATUS = frozenset({400, 413, 422})


def enqueue(conn: sqlite3.Connection, event: Mapping[str, Any]) -> None:
    """Owe `event` to the router; call inside the transaction that makes it true."""
    conn.execute("INSERT INTO outbox (event, created_at) VALUES (?, ?)", (json.dumps(event), time.time()))


def _pending(conn: sqlite3.Connection, limit: int) -> list[tuple[int, dict[str, Any]]]:
    rows = conn.execute(
        "SELECT seq, event FROM outbox WHERE refused_at IS NULL ORDER BY seq LIMIT ?", (limit,)
    ).fetchall()
    return [(row["seq"], json.loads(row["event"])) for row in rows]


def _remove(conn: sqlite3.Connection, seqs: list[int]) -> None:
    conn.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs])


def _note_failure(conn: sqlite3.Connection, seqs: list[int], error: str) -> None:
    conn.executemany(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?", [(error, seq) for seq in seqs]
    )


def _refuse(conn: sqlite3.Connection, seq: int, error: str) -> None:
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ?, refused_at = ? WHERE seq = ?",
        (error, time.time(), seq),
    )


def counts(conn: sqlite3.Connection) -> tuple[int, int]:
    """(events waiting to be published, events the router refused)."""
    row = conn.execute(
        "SELECT COUNT(*) - COUNT(refused_at) AS pending, COUNT(refused_at) AS refused FROM outbox"
    ).fetchone()
    return int(row["pending"]), int(row["refused"])


class OutboxRelay:
    """Publishes the outbox in order; waits on `wake()` when it is empty, backs off (full jitter) without a router."""

    def __init__(
        self,
        db: Database,
        client: RouterClient,
        *,
        batch_max: int = BATCH_MAX,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.db = db
        self.client = client
        self.batch_max = batch_max
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.published_total = 0
        self.refused_total = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            self._wake.clear()
            batch = await self.db.transact(_pending, self.batch_max)
            if not batch:
                await self._wake.wait()
                continue
            try:
                await self._publish(batch)
            except RouterError as exc:
                failures += 1
                self.last_error = str(exc)
                await self.db.transact(_note_failure, [seq for seq, _ in batch], str(exc))
                delay = random.uniform(0, min(self.backoff_max_s, self.backoff_initial_s * 2**failures))
                log.warning("cannot publish %d outbox event(s) (%s); trying again in %.1f s", len(batch), exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopped.wait()
                continue
            failures = 0
            self.last_error = None

    async def _publish(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        try:
            await self.client.publish_batch([event for _, event in batch])
        except RouterError as exc:
            if exc.status not in REFUSED_STATUS:
                raise
            # A batch is all or nothing: find the event at fault, one at a time.
            for seq, event in batch:
                await self._publish_one(seq, event)
            return
        await self.db.transact(_remove, [seq for seq, _ in batch])
        self.published_total += len(batch)

    async def _publish_one(self, seq: int, event: dict[str, Any]) -> None:
        try:
            await self.client.publish(event)
        except RouterError as exc:
            if exc.status not in REFUSED_STATUS:
                raise
            log.error("the router refused %s %s, set aside in the outbox: %s", event.get("type"), event.get("id"), exc)
            await self.db.transact(_refuse, seq, str(exc))
            self.refused_total += 1
            return
        await self.db.transact(_remove, [seq])
        self.published_total += 1
