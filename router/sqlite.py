"""The embedded `EventStore`: one SQLite database in WAL mode, written from one thread.

Every call runs as one transaction on a dedicated thread, so calls are serialized and each
commits before its coroutine returns. The bus batches concurrent publishes into one `append`
call (group commit), so one fsync covers many publishers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from router import announcements
from router.cloudevents import Encoded, encoded
from router.persistence import (
    Appended,
    ChangeListener,
    DeadLetter,
    Message,
    ReceiptResult,
    Replay,
    Settlement,
    Stats,
    Subscription,
    SubscriptionSpec,
    spec_from_json,
    spec_to_json,
)
from router.sqlite_schema import SCHEMA
from services.common.errors import Conflict

T = TypeVar("T")


PURGE_CHUNK = 5_000


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


STALE_RECEIPT = "unknown receipt, or the message was received again since (its visibility timeout expired)"


class SQLiteEventStore:
    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self.synchronous = synchronous
        self.listener: ChangeListener | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._level = synchronous
        # Hand-off to push dispatchers (see `offer`): slots and lease length each idle dispatcher grants,
        # and the subscriptions that may have messages ready to lease.
        self._grant_lock = threading.Lock()
        self._grants: dict[str, list[int]] = {}
        self._ready: set[str] = set()
        self._handoffs: dict[str, list[Message]] = {}
        self._subs: dict[str, Subscription] = {}
        # Filled on the store's thread during a call, handed to the listener on the loop after commit.
        self._touched: set[str] = set()
        self._hidden_until: dict[str, int] = {}

    # -- plumbing ---------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        result, touched, hidden, handoffs = await loop.run_in_executor(self._executor, self._call, fn, args)
        if touched and self.listener is not None:
            self.listener(touched, hidden, handoffs)
        return result

    def _call(
        self, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> tuple[T, set[str], dict[str, int], dict[str, list[Message]]]:
        self._touched, self._hidden_until, self._handoffs = set(), {}, {}
        return fn(*args), self._touched, self._hidden_until, self._handoffs

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "store is not open"
        return self._conn

    @contextmanager
    def _transaction(self, *, bookkeeping: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. `bookkeeping` marks the delivery state (leases, push outcomes) whose loss
        in a power failure only means an event is delivered again, which at-least-once allows: it commits
        without an fsync (still safe against a process crash, as WAL with synchronous=NORMAL is); the
        next durable commit's fsync covers it. Published events and queue acks keep the configured level."""
        conn = self.conn
        level = "NORMAL" if bookkeeping else self.synchronous
        if level != self._level:
            conn.execute(f"PRAGMA synchronous={level}")
            self._level = level
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            self._touched, self._hidden_until = set(), {}
            if self._handoffs:  # the leases handed off were rolled back: give the slots back
                with self._grant_lock:
                    for name, messages in self._handoffs.items():
                        if name in self._grants:
                            self._grants[name][0] += len(messages)
                self._handoffs = {}
            raise
        conn.execute("COMMIT")

    def _hide(self, sub: str, until_ms: int) -> None:
        self._touched.add(sub)
        self._hidden_until[sub] = min(until_ms, self._hidden_until.get(sub, until_ms))

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        self._conn = conn
        for name, spec, secret, created_at, start_seq in conn.execute(
            "SELECT name, spec, secret, created_at, start_seq FROM subscriptions"
        ):
            self._subs[name] = Subscription(spec_from_json(name, spec), secret, created_at, start_seq)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        self.conn.close()
        self._conn = None

    # -- the log ----------------------------------------------------------------------------------

    async def append(self, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        return await self._run(self._append, events, now_ms)

    def _append(self, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        with self._transaction() as conn:
            return self._append_in(conn, events, now_ms)

    def _append_in(self, conn: sqlite3.Connection, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        results: list[Appended] = []
        fanout: list[tuple[str, int, str | None, int, int]] = []
        subs = list(self._subs.values())
        for event, body in events:
            row = conn.execute(
                "INSERT INTO events (source, id, type, partitionkey, appended_at, body) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source, id) DO NOTHING RETURNING seq",
                (event["source"], event["id"], event["type"], event.get("partitionkey"), now_ms, body),
            ).fetchone()
            if row is None:
                (seq,) = conn.execute(
                    "SELECT seq FROM events WHERE source = ? AND id = ?", (event["source"], event["id"])
                ).fetchone()
                results.append(Appended(event["id"], seq, duplicate=True))
                continue
            seq = row[0]
            results.append(Appended(event["id"], seq, duplicate=False))
            for sub in subs:
                if not sub.spec.matches(event):
                    continue
                name = sub.spec.name
                self._touched.add(name)
                lease_ms = self._take_grant(name)
                if lease_ms is None:
                    fanout.append((name, seq, event.get("partitionkey"), now_ms, now_ms))
                    if not sub.spec.is_queue:
                        self._ready.add(name)
                    continue
                # An idle dispatcher granted a slot: the message is leased in this very transaction and
                # handed to it after the commit, sparing a lease transaction and a wake-up on the way out.
                (msg_id,) = conn.execute(
                    "INSERT INTO messages (sub, seq, pkey, enqueued_at, visible_at, attempts) VALUES (?, ?, ?, ?, ?, 1)"
                    " RETURNING msg_id",
                    (name, seq, event.get("partitionkey"), now_ms, now_ms + lease_ms),
                ).fetchone()
                receipt = f"{msg_id}.{secrets.token_urlsafe(12)}"
                conn.execute("UPDATE messages SET receipt = ? WHERE msg_id = ?", (receipt, msg_id))
                self._handoffs.setdefault(name, []).append(Message(receipt, 1, seq, body, now_ms))
                self._hide(name, now_ms + lease_ms)
        if fanout:
            conn.executemany(
                "INSERT INTO messages (sub, seq, pkey, enqueued_at, visible_at) VALUES (?, ?, ?, ?, ?)", fanout
            )
        return results

    # -- subscriptions ----------------------------------------------------------------------------

    async def put_subscription(self, spec: SubscriptionSpec, now_ms: int) -> tuple[Subscription, bool]:
        return await self._run(self._put_subscription, spec, now_ms)

    def _put_subscription(self, spec: SubscriptionSpec, now_ms: int) -> tuple[Subscription, bool]:
        with self._transaction() as conn:
            existing = self._subs.get(spec.name)
            if existing is not None:
                sub = Subscription(spec, existing.secret, existing.created_at_ms, existing.start_sequence)
                conn.execute("UPDATE subscriptions SET spec = ? WHERE name = ?", (spec_to_json(spec), spec.name))
                created = False
            else:
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
        self._subs[spec.name] = sub
        return sub, created

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
        return self._subs.get(name)

    async def list_subscriptions(self) -> list[Subscription]:
        return sorted(self._subs.values(), key=lambda s: s.spec.name)

    async def delete_subscription(self, name: str) -> bool:
        return await self._run(self._delete_subscription, name)

    def _delete_subscription(self, name: str) -> bool:
        if name not in self._subs:
            return False
        with self._transaction() as conn:
            conn.execute("DELETE FROM messages WHERE sub = ?", (name,))
            conn.execute("DELETE FROM dead_letters WHERE sub = ?", (name,))
            conn.execute("DELETE FROM subscriptions WHERE name = ?", (name,))
        del self._subs[name]
        self._touched.add(name)
        return True

    # -- queues and push leases --------------------------------------------------------------------

    async def receive(self, name: str, max_messages: int, visibility_timeout_ms: int, now_ms: int) -> list[Message]:
        return await self._run(self._lease, name, max_messages, visibility_timeout_ms, now_ms, True)

    async def lease(self, name: str, max_messages: int, lease_ms: int, now_ms: int) -> list[Message]:
        return await self._run(self._lease, name, max_messages, lease_ms, now_ms, False)

    def _lease(self, name: str, max_messages: int, hide_ms: int, now_ms: int, is_queue: bool) -> list[Message]:
        delivery = self._subs[name].spec.delivery
        # Ordered push: only the oldest pending message of each partition key may go out, and not
        # while it is itself in flight or waiting to be retried; events without a key are not held.
        ordered = (
            ""
            if is_queue or not delivery.ordered
            else (
                " AND (m.pkey IS NULL OR NOT EXISTS (SELECT 1 FROM messages o"
                " WHERE o.sub = m.sub AND o.pkey = m.pkey AND o.seq < m.seq))"
            )
        )
        messages: list[Message] = []
        with self._transaction(bookkeeping=True) as conn:
            while len(messages) < max_messages:
                rows = conn.execute(
                    "SELECT m.msg_id, m.seq, m.replay, m.attempts, m.last_error, m.enqueued_at, e.body"
                    " FROM messages m JOIN events e ON e.seq = m.seq"
                    f" WHERE m.sub = ? AND m.visible_at <= ?{ordered} ORDER BY m.visible_at, m.msg_id LIMIT ?",
                    (name, now_ms, max_messages - len(messages)),
                ).fetchall()
                if not rows:
                    break
                for msg_id, seq, replay, attempts, last_error, enqueued_at, body in rows:
                    if is_queue and attempts >= delivery.max_receive_count:
                        limit = f"max_receive_count {delivery.max_receive_count}"
                        reason = f"received {attempts} times without an ack ({limit})"
                        context = {"limit": "max_receive_count", "error": last_error}
                        self._dead_letter(conn, name, msg_id, seq, replay, attempts, reason, context, body, now_ms)
                        continue
                    receipt = f"{msg_id}.{secrets.token_urlsafe(12)}"
                    conn.execute(
                        "UPDATE messages SET receipt = ?, visible_at = ?, attempts = attempts + 1 WHERE msg_id = ?",
                        (receipt, now_ms + hide_ms, msg_id),
                    )
                    messages.append(Message(receipt, attempts + 1, seq, _mark(body, replay), enqueued_at, replay))
        if len(messages) < max_messages:
            self._ready.discard(name)
        if messages:
            self._hide(name, now_ms + hide_ms)
        return messages

    def _dead_letter(
        self,
        conn: sqlite3.Connection,
        sub: str,
        msg_id: int,
        seq: int,
        replay: str | None,
        attempts: int,
        reason: str,
        context: dict[str, Any],
        body: bytes,
        now_ms: int,
    ) -> None:
        conn.execute("DELETE FROM messages WHERE msg_id = ?", (msg_id,))
        conn.execute(
            "INSERT INTO dead_letters (sub, seq, replay, attempts, last_error, context, dead_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (sub, seq, replay, attempts, reason, json.dumps(context), now_ms),
        )
        conn.execute("UPDATE subscriptions SET failed_total = failed_total + 1 WHERE name = ?", (sub,))
        self._touched.add(sub)
        announcement = announcements.dead_lettered(sub, msg_id, json.loads(body), attempts, reason, context)
        self._append_in(conn, [encoded(announcement)], now_ms)

    async def settle(self, name: str, settlements: Sequence[Settlement], now_ms: int) -> list[ReceiptResult]:
        return await self._run(self._settle, name, settlements, now_ms)

    def _settle(self, name: str, settlements: Sequence[Settlement], now_ms: int) -> list[ReceiptResult]:
        results: list[ReceiptResult] = []
        delivered = retried = 0
        with self._transaction(bookkeeping=True) as conn:
            for s in settlements:
                msg_id = _msg_id(s.receipt)
                if s.kind == "ack":
                    done = conn.execute(
                        "DELETE FROM messages WHERE msg_id = ? AND sub = ? AND receipt = ?", (msg_id, name, s.receipt)
                    ).rowcount
                    delivered += done
                elif s.kind == "retry":
                    done = conn.execute(
                        "UPDATE messages SET receipt = NULL, visible_at = ?, last_error = ?"
                        " WHERE msg_id = ? AND sub = ? AND receipt = ?",
                        (now_ms + s.delay_ms, s.error, msg_id, name, s.receipt),
                    ).rowcount
                    retried += done
                    if done:
                        self._hide(name, now_ms + s.delay_ms)
                else:
                    row = conn.execute(
                        "SELECT m.seq, m.replay, m.attempts, e.body FROM messages m JOIN events e ON e.seq = m.seq"
                        " WHERE m.msg_id = ? AND m.sub = ? AND m.receipt = ?",
                        (msg_id, name, s.receipt),
                    ).fetchone()
                    done = row is not None
                    if row is not None:
                        seq, replay, attempts, body = row
                        self._dead_letter(
                            conn, name, msg_id, seq, replay, attempts, s.error or "", s.context or {}, body, now_ms
                        )
                results.append(ReceiptResult(s.receipt, bool(done), None if done else STALE_RECEIPT))
            conn.execute(
                "UPDATE subscriptions SET delivered_total = delivered_total + ?, failed_total = failed_total + ?"
                " WHERE name = ?",
                (delivered, retried, name),
            )
        self._touched.add(name)
        return results

    async def release_leases(self, name: str, now_ms: int) -> int:
        return await self._run(self._release_leases, name, now_ms)

    def _release_leases(self, name: str, now_ms: int) -> int:
        """Make every leased message of a push subscription visible now: after a restart its dispatcher
        is the only one that leases them, so none is still being delivered."""
        with self._transaction(bookkeeping=True) as conn:
            count = conn.execute(
                "UPDATE messages SET receipt = NULL, visible_at = ? WHERE sub = ? AND receipt IS NOT NULL"
                " AND visible_at > ?",
                (now_ms, name, now_ms),
            ).rowcount
        self._ready.add(name)  # a dispatcher starts by leasing whatever is there
        if count:
            self._touched.add(name)
        return count

    # -- hand-off to idle push dispatchers -----------------------------------------------------------
    # Called from the event loop; the grant is read and taken on the store's thread during an append.

    def offer(self, name: str, slots: int, lease_ms: int) -> None:
        """An idle dispatcher with `slots` free: lease new matching events to it as they are appended."""
        with self._grant_lock:
            self._grants[name] = [slots, lease_ms]

    def withdraw(self, name: str) -> int:
        """Take the offer back; returns the slots it had left (the rest were handed off)."""
        with self._grant_lock:
            grant = self._grants.pop(name, None)
        return grant[0] if grant else 0

    def may_have_ready(self, name: str) -> bool:
        """False when the last lease found nothing more and nothing was queued for it since."""
        return name in self._ready

    def mark_ready(self, name: str) -> None:
        """A hidden message's time has come (a retry delay or a lease ran out)."""
        self._ready.add(name)

    def _take_grant(self, name: str) -> int | None:
        with self._grant_lock:
            grant = self._grants.get(name)
            if grant is None or grant[0] <= 0:
                return None
            grant[0] -= 1
            return grant[1]

    async def ack(self, name: str, receipts: Sequence[str], now_ms: int) -> list[ReceiptResult]:
        return await self._run(self._ack, name, receipts)

    def _ack(self, name: str, receipts: Sequence[str]) -> list[ReceiptResult]:
        results: list[ReceiptResult] = []
        with self._transaction() as conn:
            for receipt in receipts:
                deleted = conn.execute(
                    "DELETE FROM messages WHERE msg_id = ? AND sub = ? AND receipt = ?",
                    (_msg_id(receipt), name, receipt),
                ).rowcount
                results.append(ReceiptResult(receipt, bool(deleted), None if deleted else STALE_RECEIPT))
            acked = sum(r.ok for r in results)
            if acked:
                conn.execute(
                    "UPDATE subscriptions SET delivered_total = delivered_total + ? WHERE name = ?", (acked, name)
                )
                self._touched.add(name)
        return results

    async def nack(
        self, name: str, receipts: Sequence[str], delay_ms: int, now_ms: int, error: str | None = None
    ) -> list[ReceiptResult]:
        return await self._run(self._change_visibility, name, receipts, delay_ms, now_ms, True, error)

    async def extend(
        self, name: str, receipts: Sequence[str], visibility_timeout_ms: int, now_ms: int
    ) -> list[ReceiptResult]:
        return await self._run(self._change_visibility, name, receipts, visibility_timeout_ms, now_ms, False, None)

    def _change_visibility(
        self, name: str, receipts: Sequence[str], hide_ms: int, now_ms: int, release: bool, error: str | None
    ) -> list[ReceiptResult]:
        # A nack releases the lease (the receipt dies, the message waits `hide_ms` as delayed);
        # an extend keeps the lease and pushes its visibility timeout out from now, as SQS does.
        sql = (
            "UPDATE messages SET receipt = NULL, visible_at = ?, last_error = COALESCE(?, last_error)"
            " WHERE msg_id = ? AND sub = ? AND receipt = ?"
            if release
            else "UPDATE messages SET visible_at = ? WHERE ? IS NULL AND msg_id = ? AND sub = ? AND receipt = ?"
        )
        results: list[ReceiptResult] = []
        with self._transaction() as conn:
            for receipt in receipts:
                changed = conn.execute(sql, (now_ms + hide_ms, error, _msg_id(receipt), name, receipt)).rowcount
                results.append(ReceiptResult(receipt, bool(changed), None if changed else STALE_RECEIPT))
            changed_count = sum(r.ok for r in results)
            if release and changed_count:
                conn.execute(
                    "UPDATE subscriptions SET failed_total = failed_total + ? WHERE name = ?", (changed_count, name)
                )
        if any(r.ok for r in results):
            self._touched.add(name)
            if hide_ms > 0:
                self._hide(name, now_ms + hide_ms)
        return results

    async def next_visible_ms(self, name: str, now_ms: int) -> int | None:
        return await self._run(self._next_visible_ms, name, now_ms)

    def _next_visible_ms(self, name: str, now_ms: int) -> int | None:
        (at,) = self.conn.execute(
            "SELECT MIN(visible_at) FROM messages WHERE sub = ? AND visible_at > ?", (name, now_ms)
        ).fetchone()
        return int(at) if at is not None else None

    async def stats(self, name: str, now_ms: int) -> Stats:
        return await self._run(self._stats, name, now_ms)

    def _stats(self, name: str, now_ms: int) -> Stats:
        conn = self.conn
        backlog, in_flight, delayed, oldest = conn.execute(
            "SELECT COALESCE(SUM(visible_at <= :now), 0),"
            " COALESCE(SUM(receipt IS NOT NULL AND visible_at > :now), 0),"
            " COALESCE(SUM(receipt IS NULL AND visible_at > :now), 0),"
            " MIN(enqueued_at) FROM messages WHERE sub = :sub",
            {"now": now_ms, "sub": name},
        ).fetchone()
        (dead,) = conn.execute("SELECT COUNT(*) FROM dead_letters WHERE sub = ?", (name,)).fetchone()
        delivered, failed = conn.execute(
            "SELECT delivered_total, failed_total FROM subscriptions WHERE name = ?", (name,)
        ).fetchone()
        oldest_age_s = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
        return Stats(backlog, in_flight, delayed, dead, oldest_age_s, delivered, failed)

    # -- dead letters -----------------------------------------------------------------------------

    async def dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        return await self._run(self._dead_letters, name, limit)

    def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        return [
            DeadLetter(seq, _mark(body, replay), attempts, last_error, dead_at, json.loads(context))
            for seq, replay, body, attempts, last_error, context, dead_at in self.conn.execute(
                "SELECT d.seq, d.replay, e.body, d.attempts, d.last_error, d.context, d.dead_at FROM dead_letters d"
                " JOIN events e ON e.seq = d.seq WHERE d.sub = ? ORDER BY d.dl_id LIMIT ?",
                (name, limit),
            )
        ]

    async def redrive(self, name: str, now_ms: int) -> int:
        return await self._run(self._redrive, name, now_ms)

    def _redrive(self, name: str, now_ms: int) -> int:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO messages (sub, seq, pkey, replay, enqueued_at, visible_at)"
                " SELECT d.sub, d.seq, e.partitionkey, d.replay, ?, ? FROM dead_letters d"
                " JOIN events e ON e.seq = d.seq WHERE d.sub = ? ORDER BY d.dl_id",
                (now_ms, now_ms, name),
            )
            count = conn.execute("DELETE FROM dead_letters WHERE sub = ?", (name,)).rowcount
        if count:
            self._touched.add(name)
            self._ready.add(name)
        return count

    async def purge_dead_letters(self, name: str) -> int:
        return await self._run(self._purge_dead_letters, name)

    def _purge_dead_letters(self, name: str) -> int:
        with self._transaction() as conn:
            count = conn.execute("DELETE FROM dead_letters WHERE sub = ?", (name,)).rowcount
        if count:
            self._touched.add(name)
        return count

    # -- replays ---------------------------------------------------------------------------------

    async def replay(self, name: str, replay: str, from_seq: int, to_seq: int, now_ms: int) -> Replay:
        return await self._run(self._replay, name, replay, from_seq, to_seq, now_ms)

    def _replay(self, name: str, replay: str, from_seq: int, to_seq: int, now_ms: int) -> Replay:
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM replays WHERE sub = ? AND name = ?", (name, replay)).fetchone():
                raise Conflict(f"subscription {name!r} already has a replay named {replay!r}")
            total = self._enqueue_retained(conn, self._subs[name].spec, from_seq, to_seq, replay, now_ms)
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


def _mark(body: bytes, replay: str | None) -> bytes:
    """A replayed event goes out with a `replay` extension attribute naming its replay."""
    if replay is None:
        return body
    return body[:-1] + b',"replay":' + json.dumps(replay).encode() + b"}"


def _msg_id(receipt: str) -> int:
    head = receipt.split(".", 1)[0]
    return int(head) if head.isdigit() else -1
