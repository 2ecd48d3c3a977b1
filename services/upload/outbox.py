"""The upload service's SQLite file (uploads and their outbox) and the relay that empties the outbox.

The outbox pattern: an accepted upload's record and the event announcing it are committed in one
transaction, before the 202. The relay publishes pending events in batches and deletes a row only
after the router has answered 202. So an upload succeeds while the router is down, its event goes
out once the router is back (also after a restart of either), and a publish repeated after a crash
is harmless: the event id is the video id, and the router answers a repeat with `duplicate: true`.

    outbox = Outbox(path)
    await outbox.open()
    await outbox.begin(video_id)                   # arriving: swept at start-up if we crash before it ends
    await outbox.accept(video_id, record, event)   # the record and its event, one transaction
    relay = Relay(outbox, RouterClient(url, retries=0))
    supervisor.start("outbox-relay", relay.run())
    relay.wake()                                   # after each accept
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from router.client import PublishResult, RouterClient, RouterError, RouterUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    video_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL,          -- 'receiving' until the upload is accepted, then 'accepted'
    started_at   REAL NOT NULL,
    accepted_at  REAL,
    record       TEXT,                   -- JSON: title, renditions, master, probe
    published_at REAL,
    sequence     INTEGER,                -- the event's sequence on the router's bus
    event_error  TEXT                    -- why the router refused the event, if it did
);
CREATE TABLE IF NOT EXISTS outbox (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    video_id TEXT NOT NULL,
    event    TEXT NOT NULL               -- the CloudEvent, as JSON
);
"""

# Answers that refuse an event for what it is: publishing it again cannot help.
REFUSED_STATUSES = frozenset({400, 413, 422})


@dataclass(frozen=True)
class PendingEvent:
    position: int
    video_id: str
    event: dict[str, Any]


class Outbox:
    """One SQLite database in WAL mode, used from one thread: each call is one committed transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "the outbox is not open"
        return self._conn

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # the 202 promises the event survives a power cut
        conn.executescript(SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self.conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def begin(self, video_id: str) -> None:
        """Note that an upload is arriving, so that a crash before it ends is cleaned up at the next start."""
        sql = "INSERT INTO uploads (video_id, state, started_at) VALUES (?, 'receiving', ?)"
        await self._run(self._write, sql, (video_id, time.time()))

    async def abandon(self, video_id: str) -> None:
        """Forget an upload that was refused (its objects are already removed)."""
        await self._run(self._write, "DELETE FROM uploads WHERE video_id = ? AND state = 'receiving'", (video_id,))

    async def unfinished(self) -> list[str]:
        """Uploads that were arriving when the service last stopped: their objects are to be removed."""
        rows = await self._run(self._read, "SELECT video_id FROM uploads WHERE state = 'receiving'", ())
        return [row[0] for row in rows]

    async def accept(self, video_id: str, record: dict[str, Any], event: dict[str, Any]) -> None:
        """Record the accepted upload and queue its event, in one transaction."""
        await self._run(self._accept, video_id, json.dumps(record), json.dumps(event))

    def _accept(self, video_id: str, record: str, event: str) -> None:
        with self._transaction() as conn:
            changed = conn.execute(
                "UPDATE uploads SET state = 'accepted', accepted_at = ?, record = ? "
                "WHERE video_id = ? AND state = 'receiving'",
                (time.time(), record, video_id),
            ).rowcount
            if changed != 1:
                raise RuntimeError(f"upload {video_id} is not being received")
            conn.execute("INSERT INTO outbox (video_id, event) VALUES (?, ?)", (video_id, event))

    async def pending(self, limit: int) -> list[PendingEvent]:
        """The oldest events not yet published, in the order they were accepted."""
        rows = await self._run(
            self._read, "SELECT position, video_id, event FROM outbox ORDER BY position LIMIT ?", (limit,)
        )
        return [PendingEvent(position, video_id, json.loads(event)) for position, video_id, event in rows]

    async def pending_count(self) -> int:
        rows = await self._run(self._read, "SELECT count(*) FROM outbox", ())
        count: int = rows[0][0]
        return count

    async def published(self, rows: Sequence[PendingEvent], results: Sequence[PublishResult]) -> None:
        """The router made these events durable: drop them from the outbox, note where they went."""
        done = [(row.position, row.video_id, result.sequence) for row, result in zip(rows, results, strict=True)]
        await self._run(self._published, done)

    def _published(self, done: list[tuple[int, str, int]]) -> None:
        now = time.time()
        with self._transaction() as conn:
            conn.executemany("DELETE FROM outbox WHERE position = ?", [(position,) for position, _, _ in done])
            conn.executemany(
                "UPDATE uploads SET published_at = ?, sequence = ? WHERE video_id = ?",
                [(now, sequence, video_id) for _, video_id, sequence in done],
            )

    async def refused(self, row: PendingEvent, reason: str) -> None:
        """The router refused this event for good: take it out of the outbox and keep the reason."""
        await self._run(self._refused, row, reason)

    def _refused(self, row: PendingEvent, reason: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM outbox WHERE position = ?", (row.position,))
            conn.execute("UPDATE uploads SET event_error = ? WHERE video_id = ?", (reason, row.video_id))

    async def get(self, video_id: str) -> dict[str, Any] | None:
        """What is known of an accepted upload, with the state of its event; None if there is no such upload."""
        rows = await self._run(
            self._read,
            "SELECT record, accepted_at, published_at, sequence, event_error FROM uploads "
            "WHERE video_id = ? AND state = 'accepted'",
            (video_id,),
        )
        if not rows:
            return None
        record, accepted_at, published_at, sequence, event_error = rows[0]
        status = "refused" if event_error else "published" if published_at is not None else "pending"
        event = {"id": video_id, "status": status, "published_at": _iso(published_at), "sequence": sequence}
        if event_error:
            event["error"] = event_error
        return {"video_id": video_id, **json.loads(record), "accepted_at": _iso(accepted_at), "event": event}

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._transaction() as conn:
            conn.execute(sql, params)

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT`, or `ROLLBACK` on any error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


class Relay:
    """Publishes the outbox to the router: woken when a row is added, idle otherwise (no polling).

    When the router cannot be reached it retries after an exponential backoff with jitter, on an
    asyncio timer; new rows do not cut a backoff short, so a router that is down is not hammered.
    The `RouterClient` should not retry by itself (`retries=0`): this loop owns the timing.
    """

    def __init__(
        self,
        outbox: Outbox,
        router: RouterClient,
        *,
        batch_size: int = 100,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_published: Callable[[int], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.router = router
        self.batch_size = batch_size
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.on_published = on_published
        self.on_failure = on_failure
        self.failures = 0
        self.last_error: str | None = None
        self._wakeup = asyncio.Event()
        self._retry: asyncio.TimerHandle | None = None
        self._stopping = False

    def wake(self) -> None:
        """A row was added: publish it now, unless waiting out a backoff."""
        if self._retry is None:
            self._wakeup.set()

    def stop(self) -> None:
        self._stopping = True
        self._cancel_retry()
        self._wakeup.set()

    async def run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()  # before reading: a row added from here on sets it again
                rows = await self.outbox.pending(self.batch_size)
                if rows:
                    if await self._publish(rows):
                        continue
                    self._back_off()
                await self._wakeup.wait()
        finally:
            self._cancel_retry()

    async def _publish(self, rows: list[PendingEvent]) -> bool:
        try:
            results = await self.router.publish_batch([row.event for row in rows])
        except RouterError as exc:
            if isinstance(exc, RouterUnavailable) or exc.status not in REFUSED_STATUSES:
                self._failed(exc)
                return False
            if len(rows) > 1:
                return await self._publish_one_by_one(rows)
            await self._refuse(rows[0], exc)
            return True
        await self.outbox.published(rows, results)
        self._succeeded(len(rows))
        return True

    async def _publish_one_by_one(self, rows: list[PendingEvent]) -> bool:
        """A batch was refused: find the events the router will not take, and publish the others."""
        for row in rows:
            if not await self._publish([row]):
                return False
        return True

    async def _refuse(self, row: PendingEvent, exc: RouterError) -> None:
        log.error("the router refused the event of upload %s for good, dropping it: %s", row.video_id, exc)
        await self.outbox.refused(row, str(exc))

    def _succeeded(self, count: int) -> None:
        if self.failures:
            log.info("router reachable again after %d failed attempt(s); outbox draining", self.failures)
        self.failures = 0
        self.last_error = None
        if self.on_published is not None:
            self.on_published(count)

    def _failed(self, exc: RouterError) -> None:
        self.failures += 1
        self.last_error = str(exc)
        if self.on_failure is not None:
            self.on_failure()

    def _back_off(self) -> None:
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self.failures - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter": spread out, never immediate
        log.warning("publishing the outbox failed (%s); retrying in %.1f s", self.last_error, delay)
        self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._wakeup.set()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
