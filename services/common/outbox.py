"""A transactional outbox: events recorded in the service's own transaction, published when the router takes them.

    outbox.enqueue(conn, event)        # inside the transaction (`Database.transact`) that makes it true
    relay = OutboxRelay(db, router)    # run() publishes in order, in batches, with backoff
    relay.wake()                       # after the transaction commits: there is something to send

A change and the event announcing it (a video becomes ready and its `cattube.video.ready` is owed)
commit together, so neither can happen without the other, and the service keeps working while the
router is down: the events wait here (on disk) and go out, in the order they were recorded, once it
is back. A row is deleted only after the router's 202. Every event has a fixed id, so a batch
published twice (the answer was lost) is recognized by the router as the same events. An event the
router refuses as malformed (400, 413, 422) is set aside with the reason, logged, and never blocks
the ones behind it. A database that is away pauses the relay (with backoff) rather than ending it.

Rows have an `owner`: '' unless a process must relay only its own (processing instances sharing
one PostgreSQL each relay theirs, in their order). Replicas that share rows (store, upload) may
publish the same row at once; the router answers the second as a duplicate, and each relay still
publishes in row order, so an event never overtakes one recorded before it.

The relay's hooks: `on_published(count)` and `on_failure()` after the fact (metrics), and
`note_published(conn, [(event, result), ...])` / `note_refused(conn, event, reason)` inside the
transaction that takes the events out of the queue, for a service that keeps their fate elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from router.client import PublishResult, RouterClient, RouterError
from services.common.db import Connection, Database, Migrations
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

OUTBOX = Migrations(
    "outbox",
    sqlite=(
        """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    refused_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (refused_at, seq);
""",
        """
ALTER TABLE outbox ADD COLUMN owner TEXT NOT NULL DEFAULT '';
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (owner, refused_at, seq);
""",
    ),
    postgres=(
        """
CREATE TABLE outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    refused_at DOUBLE PRECISION
);
CREATE INDEX outbox_pending ON outbox (refused_at, seq);
""",
        """
ALTER TABLE outbox ADD COLUMN owner TEXT NOT NULL DEFAULT '';
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (owner, refused_at, seq);
""",
    ),
)
"""The outbox's table: add it to the migrations of every database that records events."""

BATCH_MAX = 50
REFUSED_STATUS = frozenset({400, 413, 422})

# The events the router took, with where it put them; the hooks that note an event's fate in its transaction.
Published = list[tuple[dict[str, Any], PublishResult]]
NotePublished = Callable[[Connection, Published], None]
NoteRefused = Callable[[Connection, dict[str, Any], str], None]


def enqueue(conn: Connection, event: Mapping[str, Any], owner: str = "") -> None:
    """Owe `event` to the router; call inside the transaction that makes it true."""
    conn.execute(
        "INSERT INTO outbox (event, created_at, owner) VALUES (?, ?, ?)", json.dumps(event), time.time(), owner
    )


def _pending(conn: Connection, limit: int, owner: str) -> list[tuple[int, dict[str, Any]]]:
    rows = conn.fetch(
        "SELECT seq, event FROM outbox WHERE owner = ? AND refused_at IS NULL ORDER BY seq LIMIT ?", owner, limit
    )
    return [(row["seq"], json.loads(row["event"])) for row in rows]


def _remove(conn: Connection, seqs: list[int], published: Published, note: NotePublished | None = None) -> None:
    conn.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs])
    if note is not None:
        note(conn, published)


def _note_failure(conn: Connection, seqs: list[int], error: str) -> None:
    conn.executemany(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?", [(error, seq) for seq in seqs]
    )


def _refuse(conn: Connection, seq: int, event: dict[str, Any], error: str, note: NoteRefused | None = None) -> None:
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ?, refused_at = ? WHERE seq = ?",
        error,
        time.time(),
        seq,
    )
    if note is not None:
        note(conn, event, error)


def counts(conn: Connection, owner: str | None = None) -> tuple[int, int]:
    """(events waiting to be published, events the router refused): `owner`'s, or everyone's."""
    select = "SELECT COUNT(*) - COUNT(refused_at) AS pending, COUNT(refused_at) AS refused FROM outbox"
    row = conn.fetchrow(select) if owner is None else conn.fetchrow(f"{select} WHERE owner = ?", owner)
    assert row is not None
    return int(row["pending"]), int(row["refused"])


class OutboxRelay:
    """Publishes the outbox in order; waits on `wake()` when it is empty, backs off without a router.

    The backoff is exponential with "equal jitter" (half the ceiling, plus up to as much again), so a
    router that is down is never retried at once; `wake()` does not cut a backoff short. The
    `RouterClient` should not retry by itself (`retries=0`): this loop owns the timing.
    """

    def __init__(
        self,
        db: Database,
        client: RouterClient,
        *,
        batch_max: int = BATCH_MAX,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_published: Callable[[int], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        note_published: NotePublished | None = None,
        note_refused: NoteRefused | None = None,
        owner: str = "",
    ) -> None:
        self.db = db
        self.owner = owner
        self.client = client
        self.batch_max = batch_max
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.on_published = on_published
        self.on_failure = on_failure
        self.note_published = note_published
        self.note_refused = note_refused
        self.published_total = 0
        self.refused_total = 0
        self.failures = 0
        self.database_failures = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()  # before reading: an event enqueued from here on sets it again
            try:
                batch = await self.db.transact(_pending, self.batch_max, self.owner)
                if self.database_failures:
                    log.info("the %s answers again after %d failed attempt(s)", self.db.name, self.database_failures)
                    self.database_failures = 0
                if not batch:
                    await self._wake.wait()
                    continue
                await self._publish(batch)
            except RouterError as exc:
                await self._failed(batch, exc)
                continue
            except Unavailable as exc:
                # The database is away: what the router already took goes again later (a duplicate it recognizes).
                await self._database_away(exc)
                continue
            if self.failures:
                log.info("router reachable again after %d failed attempt(s); outbox draining", self.failures)
            self.failures = 0
            self.last_error = None

    async def _failed(self, batch: list[tuple[int, dict[str, Any]]], exc: RouterError) -> None:
        self.failures += 1
        self.last_error = str(exc)
        if self.on_failure is not None:
            self.on_failure()
        with contextlib.suppress(Unavailable):  # only bookkeeping: the events stay owed either way
            await self.db.transact(_note_failure, [seq for seq, _ in batch], str(exc))
        delay = self._backoff(self.failures)
        log.warning("cannot publish %d outbox event(s) (%s); trying again in %.1f s", len(batch), exc, delay)
        await self._pause(delay)

    async def _database_away(self, exc: Unavailable) -> None:
        self.database_failures += 1
        delay = self._backoff(self.database_failures)
        log.warning("cannot read the outbox (%s); trying again in %.1f s", exc.detail, delay)
        await self._pause(delay)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** (failures - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopped.wait()

    async def _publish(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        try:
            results = await self.client.publish_batch([event for _, event in batch])
        except RouterError as exc:
            if exc.status not in REFUSED_STATUS:
                raise
            if len(batch) == 1:
                await self._refuse(*batch[0], exc)
                return
            # A batch is all or nothing: find the event at fault, one at a time.
            for seq, event in batch:
                await self._publish([(seq, event)])
            return
        published = [(event, result) for (_, event), result in zip(batch, results, strict=True)]
        await self.db.transact(_remove, [seq for seq, _ in batch], published, self.note_published)
        self.published_total += len(batch)
        if self.on_published is not None:
            self.on_published(len(batch))

    async def _refuse(self, seq: int, event: dict[str, Any], exc: RouterError) -> None:
        log.error("the router refused %s %s, set aside in the outbox: %s", event.get("type"), event.get("id"), exc)
        await self.db.transact(_refuse, seq, event, str(exc), self.note_refused)
        self.refused_total += 1
