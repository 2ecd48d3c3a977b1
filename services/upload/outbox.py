"""The upload service's database: uploads and their events, on `services.common`'s database and outbox.

An accepted upload's record and the event announcing it are committed in one transaction, before
the 202 (synchronous=FULL on SQLite: the event survives a power cut). The common `OutboxRelay`
publishes pending events and deletes a row only after the router's 202; it notes here, in the same
transaction, where each event went or why the router refused it. So an upload succeeds while the
router is down, its event goes out once the router is back (also after a restart of either), and a
publish repeated after a crash is harmless: the event id is the video id, and the router answers a
repeat with `duplicate: true`.

    outbox = Outbox(db, owner="upload-1")          # owner: this replica's uploads, on a shared database
    await outbox.open()
    await outbox.begin(video_id)                   # arriving: swept at start-up if we crash before it ends
    await outbox.accept(video_id, record, event)   # the record and its event, one transaction
    relay = outbox.relay(RouterClient(url, retries=0))
    supervisor.start("outbox-relay", relay.run())
    relay.wake()                                   # after each accept
"""

from __future__ import annotations

import json
import time
from typing import Any

from router.client import RouterClient
from services.common import outbox
from services.common.db import Connection, Database, Migrations
from services.common.outbox import OutboxRelay, Published
from services.common.timestamps import iso_utc

POSTGRES_SCHEMA = "upload"
UPLOADS = Migrations(
    "uploads",
    sqlite=(
        """
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
""",
        # 2: the replica that receives an upload, so that only it sweeps the upload after a crash.
        "ALTER TABLE uploads ADD COLUMN owner TEXT NOT NULL DEFAULT '';",
    ),
    postgres=(
        """
CREATE TABLE uploads (
    video_id     TEXT PRIMARY KEY,
    state        TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    accepted_at  DOUBLE PRECISION,
    record       TEXT,
    published_at DOUBLE PRECISION,
    sequence     BIGINT,
    event_error  TEXT
);
""",
        "ALTER TABLE uploads ADD COLUMN owner TEXT NOT NULL DEFAULT '';",
    ),
)
MIGRATIONS = (UPLOADS, outbox.OUTBOX)


class Outbox:
    """The uploads table and the outbox, one `Database` (made with `MIGRATIONS`): each call is one transaction.

    `owner` names this replica's uploads: on a database several replicas share, each sweeps only its own.
    """

    def __init__(self, db: Database, *, owner: str = "") -> None:
        self.db = db
        self.owner = owner
        self.opened_at = time.time()

    async def open(self) -> None:
        # Uploads begun from now on are this run's: the sweep, whenever it runs, leaves them alone.
        self.opened_at = time.time()
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    def relay(self, client: RouterClient, **options: Any) -> OutboxRelay:
        """The relay for this outbox, noting each event's fate on its upload; `options` go to `OutboxRelay`."""
        return OutboxRelay(self.db, client, note_published=_published, note_refused=_refused, **options)

    async def begin(self, video_id: str) -> None:
        """Note that an upload is arriving, so that a crash before it ends is cleaned up at the next start."""
        await self.db.transact(_begin, video_id, self.owner)

    async def abandon(self, video_id: str) -> None:
        """Forget an upload that was refused (its objects are already removed)."""
        await self.db.transact(_abandon, video_id)

    async def unfinished(self) -> list[str]:
        """Uploads that were arriving when the service last stopped: their objects are to be removed."""
        return await self.db.transact(_unfinished, self.owner, self.opened_at)

    async def accept(self, video_id: str, record: dict[str, Any], event: dict[str, Any]) -> None:
        """Record the accepted upload and queue its event, in one transaction."""
        await self.db.transact(_accept, video_id, record, event)

    async def pending_count(self) -> int:
        """Events waiting to be published (not those the router refused)."""
        pending, _ = await self.db.transact(outbox.counts, "")
        return pending

    async def get(self, video_id: str) -> dict[str, Any] | None:
        """What is known of an accepted upload, with the state of its event; None if there is no such upload."""
        return await self.db.transact(_get, video_id)


def _begin(conn: Connection, video_id: str, owner: str) -> None:
    conn.execute(
        "INSERT INTO uploads (video_id, state, started_at, owner) VALUES (?, 'receiving', ?, ?)",
        video_id,
        time.time(),
        owner,
    )


def _abandon(conn: Connection, video_id: str) -> None:
    conn.execute("DELETE FROM uploads WHERE video_id = ? AND state = 'receiving'", video_id)


def _unfinished(conn: Connection, owner: str, before: float) -> list[str]:
    rows = conn.fetch(
        "SELECT video_id FROM uploads WHERE state = 'receiving' AND owner = ? AND started_at < ?", owner, before
    )
    return [row["video_id"] for row in rows]


def _accept(conn: Connection, video_id: str, record: dict[str, Any], event: dict[str, Any]) -> None:
    changed = conn.execute(
        "UPDATE uploads SET state = 'accepted', accepted_at = ?, record = ? WHERE video_id = ? AND state = 'receiving'",
        time.time(),
        json.dumps(record),
        video_id,
    )
    if changed != 1:
        raise RuntimeError(f"upload {video_id} is not being received")
    outbox.enqueue(conn, event)


def _published(conn: Connection, published: Published) -> None:
    """The router made these events durable (the event id is the video id): note where they went."""
    now = time.time()
    conn.executemany(
        "UPDATE uploads SET published_at = ?, sequence = ? WHERE video_id = ?",
        [(now, result.sequence, event["id"]) for event, result in published],
    )


def _refused(conn: Connection, event: dict[str, Any], reason: str) -> None:
    conn.execute("UPDATE uploads SET event_error = ? WHERE video_id = ?", reason, event["id"])


def _get(conn: Connection, video_id: str) -> dict[str, Any] | None:
    row = conn.fetchrow(
        "SELECT record, accepted_at, published_at, sequence, event_error FROM uploads "
        "WHERE video_id = ? AND state = 'accepted'",
        video_id,
    )
    if row is None:
        return None
    error, published_at = row["event_error"], row["published_at"]
    status = "refused" if error else "published" if published_at is not None else "pending"
    event = {"id": video_id, "status": status, "published_at": _iso(published_at), "sequence": row["sequence"]}
    if error:
        event["error"] = error
    return {"video_id": video_id, **json.loads(row["record"]), "accepted_at": _iso(row["accepted_at"]), "event": event}


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else iso_utc(timestamp)
