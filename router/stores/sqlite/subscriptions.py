"""The embedded `EventStore`, part 3: subscriptions, replays and retention (`core` and `queues` hold
the rest; `SQLiteEventStore` is the whole)."""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3

from router.persistence import (
    Replay,
    Subscription,
    SubscriptionSpec,
    over_subscription_limit,
    spec_from_json,
    spec_to_json,
)
from router.stores.sqlite.queues import SQLiteQueues
from services.common.errors import Conflict, NotFound

PURGE_CHUNK = 5_000


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class SQLiteEventStore(SQLiteQueues):
    """The embedded event store: one SQLite database in WAL mode, written from one thread."""

    # -- subscriptions ----------------------------------------------------------------------------

    async def put_subscription(
        self, spec: SubscriptionSpec, now_ms: int, *, max_subscriptions: int | None = None
    ) -> tuple[Subscription, bool]:
        return await self._run(self._put_subscription, spec, now_ms, max_subscriptions)

    def _put_subscription(
        self, spec: SubscriptionSpec, now_ms: int, max_subscriptions: int | None
    ) -> tuple[Subscription, bool]:
        with self._transaction() as conn:
            existing = conn.execute(
                "SELECT secret, created_at, start_seq FROM subscriptions WHERE name = ?", (spec.name,)
            ).fetchone()
            if existing is not None:
                sub = Subscription(spec, *existing)
                conn.execute("UPDATE subscriptions SET spec = ? WHERE name = ?", (spec_to_json(spec), spec.name))
                created = False
            else:
                if max_subscriptions is not None:
                    (count,) = conn.execute("SELECT COUNT(*) FROM subscriptions").fetchone()
                    if count >= max_subscriptions:
                        raise over_subscription_limit(count, max_subscriptions)
                (last,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
                start_seq = (
                    {"latest": last + 1, "earliest": 0}[spec.start] if isinstance(spec.start, str) else spec.start
                )
                sub = Subscription(spec, new_secret(), now_ms, start_seq)
                conn.execute(
                    "INSERT INTO subscriptions (name, spec, secret, created_at, start_seq) VALUES (?, ?, ?, ?, ?)",
                    (spec.name, spec_to_json(spec), sub.secret, now_ms, start_seq),
                )
                self._enqueue_retained(conn, spec, start_seq, None, None, now_ms)
                created = True
            self._catalog_changed(conn)
        return sub, created

    def _catalog_changed(self, conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE catalog SET version = version + 1")
        self._catalog = True

    def _enqueue_retained(
        self,
        conn: sqlite3.Connection,
        spec: SubscriptionSpec,
        from_seq: int,
        to_seq: int | None,
        replay: str | None,
        now_ms: int,
    ) -> int:
        """Queue the retained events in [from_seq, to_seq] that match `spec` (a new subscription's
        start position, or a replay)."""
        rows = [
            (spec.name, seq, pkey, replay, now_ms, now_ms)
            for seq, pkey, body in conn.execute(
                "SELECT seq, partitionkey, body FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq",
                (from_seq, to_seq if to_seq is not None else 2**62),
            )
            if spec.matches(json.loads(body))
        ]
        conn.executemany(
            "INSERT INTO messages (sub, seq, pkey, replay, enqueued_at, visible_at) VALUES (?, ?, ?, ?, ?, ?)", rows
        )
        if rows:
            self._touched.add(spec.name)
            self._ready.add(spec.name)
        return len(rows)

    async def get_subscription(self, name: str) -> Subscription | None:
        return await self._run(self._get_subscription, name)

    def _get_subscription(self, name: str) -> Subscription | None:
        row = self.conn.execute(
            "SELECT spec, secret, created_at, start_seq FROM subscriptions WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else Subscription(spec_from_json(name, row[0]), *row[1:])

    async def list_subscriptions(self) -> list[Subscription]:
        return (await self.load_subscriptions())[1]

    async def load_subscriptions(self) -> tuple[int, list[Subscription]]:
        return await self._run(self._load_subscriptions)

    def _load_subscriptions(self) -> tuple[int, list[Subscription]]:
        conn = self.conn
        return self._catalog_version(conn), self._read_subscriptions(conn)

    async def delete_subscription(self, name: str) -> bool:
        return await self._run(self._delete_subscription, name)

    def _delete_subscription(self, name: str) -> bool:
        with self._transaction() as conn:
            if not conn.execute("DELETE FROM subscriptions WHERE name = ?", (name,)).rowcount:
                return False
            conn.execute("DELETE FROM messages WHERE sub = ?", (name,))
            conn.execute("DELETE FROM dead_letters WHERE sub = ?", (name,))
            self._catalog_changed(conn)
            self._touched.add(name)
        return True

    # -- replays ---------------------------------------------------------------------------------

    async def replay(self, name: str, replay: str, from_seq: int, to_seq: int, now_ms: int) -> Replay:
        return await self._run(self._replay, name, replay, from_seq, to_seq, now_ms)

    def _replay(self, name: str, replay: str, from_seq: int, to_seq: int, now_ms: int) -> Replay:
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM replays WHERE sub = ? AND name = ?", (name, replay)).fetchone():
                raise Conflict(f"subscription {name!r} already has a replay named {replay!r}")
            row = conn.execute("SELECT spec FROM subscriptions WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"no subscription named {name!r}")
            spec = spec_from_json(name, row[0])
            total = self._enqueue_retained(conn, spec, from_seq, to_seq, replay, now_ms)
            conn.execute(
                "INSERT INTO replays (sub, name, from_seq, to_seq, total, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (name, replay, from_seq, to_seq, total, now_ms),
            )
        return self._replay_status(name, replay)  # type: ignore[return-value]

    async def replay_status(self, name: str, replay: str) -> Replay | None:
        return await self._run(self._replay_status, name, replay)

    def _replay_status(self, name: str, replay: str) -> Replay | None:
        conn = self.conn
        row = conn.execute(
            "SELECT from_seq, to_seq, total, created_at FROM replays WHERE sub = ? AND name = ?", (name, replay)
        ).fetchone()
        if row is None:
            return None
        (pending,) = conn.execute(
            "SELECT COUNT(*) FROM messages WHERE sub = ? AND replay = ?", (name, replay)
        ).fetchone()
        (dead,) = conn.execute(
            "SELECT COUNT(*) FROM dead_letters WHERE sub = ? AND replay = ?", (name, replay)
        ).fetchone()
        from_seq, to_seq, total, created_at = row
        return Replay(replay, name, from_seq, to_seq, total, total - pending - dead, pending, dead, created_at)

    async def sequence_at(self, at_ms: int) -> int:
        """The first sequence appended at or after `at_ms` (one past the last if none)."""
        return await self._run(self._sequence_at, at_ms)

    def _sequence_at(self, at_ms: int) -> int:
        row = self.conn.execute("SELECT MIN(seq) FROM events WHERE appended_at >= ?", (at_ms,)).fetchone()
        if row[0] is not None:
            return int(row[0])
        (last,) = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(last) + 1

    # -- retention --------------------------------------------------------------------------------

    async def purge_expired(self, before_ms: int) -> int:
        total = 0
        # In chunks, each its own transaction, so publishes are not held up behind a long purge.
        while count := await self._run(self._purge_chunk, before_ms):
            total += count
        return total

    def _purge_chunk(self, before_ms: int) -> int:
        with self._transaction() as conn:
            return conn.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE e.appended_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.seq = e.seq)"
                " AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.seq = e.seq) LIMIT ?)",
                (before_ms, PURGE_CHUNK),
            ).rowcount
