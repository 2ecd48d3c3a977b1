"""The embedded `EventStore`, part 2: queue receives, push leases, outcomes and dead letters.

Acks, nacks and extends are group-committed across requests, as publishes are (router.batching): whatever
queued up while the previous one committed and synced goes into one transaction and one fdatasync, and an
item that fails alone is answered alone.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from router import dead_letters
from router.batching import GroupCommit
from router.fanout import Fanout
from router.notifier import Notifier
from router.persistence import DeadLetter, Message, ReceiptResult, Settlement, Stats
from router.receipts import STALE_RECEIPT, message_id_of, new_nonce, receipt_for
from router.replays import mark_replay
from router.stores.sqlite.core import SQLiteCore
from services.common.errors import NotFound

MAX_RECEIPTS_PER_COMMIT = 1000
"""Receipts settled in one shared transaction at most (ten requests of the largest kind)."""


@dataclass(frozen=True, slots=True)
class QueueChange:
    """One ack, nack or extend request, waiting for the next shared commit."""

    kind: Literal["ack", "nack", "extend"]
    name: str
    receipts: Sequence[str]
    now_ms: int
    hide_ms: int = 0
    error: str | None = None


class SQLiteQueues(SQLiteCore):
    _queue_writer: GroupCommit[QueueChange, list[ReceiptResult]] | None = None
    _queue_writing: asyncio.Task[None] | None = None

    async def open(self, notifier: Notifier, fanout: Fanout) -> None:
        await super().open(notifier, fanout)
        self._queue_writer = GroupCommit(
            "the queues' acks",
            self._commit_changes,
            weight=lambda c: len(c.receipts),
            max_weight=MAX_RECEIPTS_PER_COMMIT,
        )
        self._queue_writing = asyncio.create_task(self._queue_writer.run(), name="router-sqlite-acks")

    async def close(self) -> None:
        if self._queue_writer is not None and self._queue_writing is not None:
            self._queue_writer.stop()  # what is queued still commits
            await self._queue_writing
        await super().close()

    async def _settle_queue(self, change: QueueChange) -> list[ReceiptResult]:
        if self._queue_writer is None:
            return (await self._commit_changes([change]))[0]
        return await self._queue_writer.submit(change)

    async def _commit_changes(self, changes: list[QueueChange]) -> list[list[ReceiptResult]]:
        return await self._run(self._apply_changes, changes, inline=True)

    def _apply_changes(self, changes: list[QueueChange]) -> list[list[ReceiptResult]]:
        with self._transaction() as conn:
            return [
                self._ack_in(conn, c.name, c.receipts)
                if c.kind == "ack"
                else self._change_visibility_in(
                    conn, c.name, c.receipts, c.hide_ms, c.now_ms, c.kind == "nack", c.error
                )
                for c in changes
            ]

    # -- queues and push leases --------------------------------------------------------------------

    async def receive(
        self, name: str, max_messages: int, visibility_timeout_ms: int, now_ms: int, max_receive_count: int
    ) -> list[Message]:
        return await self._run(
            self._lease, name, max_messages, visibility_timeout_ms, now_ms, max_receive_count, False, inline=True
        )

    async def lease(self, name: str, max_messages: int, lease_ms: int, now_ms: int, ordered: bool) -> list[Message]:
        return await self._run(self._lease, name, max_messages, lease_ms, now_ms, None, ordered, inline=True)

    def _lease(
        self, name: str, max_messages: int, hide_ms: int, now_ms: int, max_receive_count: int | None, ordered: bool
    ) -> list[Message]:
        # Ordered push: only the oldest pending message of each partition key may go out, and not
        # while it is itself in flight or waiting to be retried; events without a key are not held.
        held_back = (
            ""
            if not ordered
            else (
                " AND (m.pkey IS NULL OR NOT EXISTS (SELECT 1 FROM messages o"
                " WHERE o.sub = m.sub AND o.pkey = m.pkey AND o.seq < m.seq))"
            )
        )
        messages: list[Message] = []
        nonce = new_nonce()
        with self._transaction(bookkeeping=True) as conn:
            while len(messages) < max_messages:
                rows = conn.execute(
                    "SELECT m.msg_id, m.seq, m.replay, m.attempts, m.last_error, m.enqueued_at, e.body"
                    " FROM messages m JOIN events e ON e.seq = m.seq"
                    f" WHERE m.sub = ? AND m.visible_at <= ?{held_back} ORDER BY m.visible_at, m.msg_id LIMIT ?",
                    (name, now_ms, max_messages - len(messages)),
                ).fetchall()
                if not rows:
                    break
                for msg_id, seq, replay, attempts, last_error, enqueued_at, body in rows:
                    verdict = dead_letters.over_receive_limit(attempts, max_receive_count, last_error)
                    if verdict is not None:
                        self._dead_letter(
                            conn, name, msg_id, seq, replay, attempts, verdict.reason, verdict.context, body, now_ms
                        )
                        continue
                    receipt = receipt_for(msg_id, nonce)
                    conn.execute(
                        "UPDATE messages SET receipt = ?, visible_at = ?, attempts = attempts + 1, holder = ?"
                        " WHERE msg_id = ?",
                        (receipt, now_ms + hide_ms, self.replica_id, msg_id),
                    )
                    messages.append(Message(receipt, attempts + 1, seq, mark_replay(body, replay), enqueued_at, replay))
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
        self._append_in(conn, [dead_letters.announcement(sub, msg_id, body, attempts, reason, context)], now_ms)

    async def settle(self, name: str, settlements: Sequence[Settlement], now_ms: int) -> list[ReceiptResult]:
        return await self._run(self._settle, name, settlements, now_ms, inline=True)

    def _settle(self, name: str, settlements: Sequence[Settlement], now_ms: int) -> list[ReceiptResult]:
        results: list[ReceiptResult] = []
        delivered = retried = 0
        with self._transaction(bookkeeping=True) as conn:
            for s in settlements:
                msg_id = message_id_of(s.receipt)
                if s.kind == "ack":
                    done = conn.execute(
                        "DELETE FROM messages WHERE msg_id = ? AND sub = ? AND receipt = ?", (msg_id, name, s.receipt)
                    ).rowcount
                    delivered += done
                elif s.kind == "retry":
                    done = conn.execute(
                        "UPDATE messages SET receipt = NULL, holder = NULL, visible_at = ?, last_error = ?"
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

    async def release(self, name: str, receipts: Sequence[str], now_ms: int) -> None:
        await self._run(self._release, name, receipts, now_ms, inline=True)

    def _release(self, name: str, receipts: Sequence[str], now_ms: int) -> None:
        with self._transaction(bookkeeping=True) as conn:
            conn.executemany(
                "UPDATE messages SET receipt = NULL, holder = NULL, visible_at = ?, attempts = MAX(attempts - 1, 0)"
                " WHERE msg_id = ? AND sub = ? AND receipt = ?",
                [(now_ms, message_id_of(r), name, r) for r in receipts],
            )
            self._touched.add(name)
            self._ready.add(name)

    async def release_leases(self, name: str, now_ms: int) -> int:
        return await self._run(self._release_leases, name, now_ms)

    def _release_leases(self, name: str, now_ms: int) -> int:
        """Make this replica's live leases of a push subscription visible now: its dispatcher is starting,
        so none of them is being delivered any more. Another holder's lease is left alone until it
        expires (an earlier incarnation's included: `replica_id` is new at every start)."""
        with self._transaction(bookkeeping=True) as conn:
            count = conn.execute(
                "UPDATE messages SET receipt = NULL, holder = NULL, visible_at = ?"
                " WHERE sub = ? AND holder = ? AND receipt IS NOT NULL AND visible_at > ?",
                (now_ms, name, self.replica_id, now_ms),
            ).rowcount
            if count:
                self._touched.add(name)
                self._ready.add(name)
        return count

    async def ack(self, name: str, receipts: Sequence[str], now_ms: int) -> list[ReceiptResult]:
        return await self._settle_queue(QueueChange("ack", name, receipts, now_ms))

    def _ack_in(self, conn: sqlite3.Connection, name: str, receipts: Sequence[str]) -> list[ReceiptResult]:
        results: list[ReceiptResult] = []
        for receipt in receipts:
            deleted = conn.execute(
                "DELETE FROM messages WHERE msg_id = ? AND sub = ? AND receipt = ?",
                (message_id_of(receipt), name, receipt),
            ).rowcount
            results.append(ReceiptResult(receipt, bool(deleted), None if deleted else STALE_RECEIPT))
        acked = sum(r.ok for r in results)
        if acked:
            conn.execute("UPDATE subscriptions SET delivered_total = delivered_total + ? WHERE name = ?", (acked, name))
            self._touched.add(name)
        return results

    async def nack(
        self, name: str, receipts: Sequence[str], delay_ms: int, now_ms: int, error: str | None = None
    ) -> list[ReceiptResult]:
        return await self._settle_queue(QueueChange("nack", name, receipts, now_ms, delay_ms, error))

    async def extend(
        self, name: str, receipts: Sequence[str], visibility_timeout_ms: int, now_ms: int
    ) -> list[ReceiptResult]:
        return await self._settle_queue(QueueChange("extend", name, receipts, now_ms, visibility_timeout_ms))

    def _change_visibility_in(
        self,
        conn: sqlite3.Connection,
        name: str,
        receipts: Sequence[str],
        hide_ms: int,
        now_ms: int,
        release: bool,
        error: str | None,
    ) -> list[ReceiptResult]:
        # A nack releases the lease (the receipt dies, the message waits `hide_ms` as delayed);
        # an extend keeps the lease and pushes its visibility timeout out from now, as SQS does.
        sql = (
            "UPDATE messages SET receipt = NULL, holder = NULL, visible_at = ?, last_error = COALESCE(?, last_error)"
            " WHERE msg_id = ? AND sub = ? AND receipt = ?"
            if release
            else "UPDATE messages SET visible_at = ? WHERE ? IS NULL AND msg_id = ? AND sub = ? AND receipt = ?"
        )
        results: list[ReceiptResult] = []
        for receipt in receipts:
            changed = conn.execute(sql, (now_ms + hide_ms, error, message_id_of(receipt), name, receipt)).rowcount
            results.append(ReceiptResult(receipt, bool(changed), None if changed else STALE_RECEIPT))
        changed_count = sum(r.ok for r in results)
        if release and changed_count:
            conn.execute(
                "UPDATE subscriptions SET failed_total = failed_total + ? WHERE name = ?", (changed_count, name)
            )
        if changed_count:
            self._touched.add(name)
            if hide_ms > 0:
                self._hide(name, now_ms + hide_ms)
            elif release:
                self._ready.add(name)
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
        # Range counts on the (sub, visible_at) index rather than one pass over every row with
        # expressions: the ready part is counted from the index alone (200k messages: 56 -> 7 ms), and
        # only the hidden part, usually small, is read for its receipts.
        conn = self.conn
        (backlog,) = conn.execute(
            "SELECT COUNT(*) FROM messages WHERE sub = ? AND visible_at <= ?", (name, now_ms)
        ).fetchone()
        in_flight = delayed = 0
        oldest: int | None = None
        for leased, count, hidden_oldest in conn.execute(
            "SELECT receipt IS NOT NULL, COUNT(*), MIN(enqueued_at) FROM messages"
            " WHERE sub = ? AND visible_at > ? GROUP BY 1",
            (name, now_ms),
        ):
            in_flight, delayed = (count, delayed) if leased else (in_flight, count)
            oldest = hidden_oldest if oldest is None else min(oldest, hidden_oldest)
        # Approximate, as SQS's ApproximateAgeOfOldestMessage: the first ready message in line.
        first = conn.execute(
            "SELECT enqueued_at FROM messages WHERE sub = ? AND visible_at <= ? ORDER BY visible_at, msg_id LIMIT 1",
            (name, now_ms),
        ).fetchone()
        if first is not None:
            oldest = first[0] if oldest is None else min(oldest, first[0])
        (dead,) = conn.execute("SELECT COUNT(*) FROM dead_letters WHERE sub = ?", (name,)).fetchone()
        row = conn.execute(
            "SELECT delivered_total, failed_total, version FROM subscriptions WHERE name = ?", (name,)
        ).fetchone()
        if row is None:  # deleted between the bus's look-up and this read
            raise NotFound(f"no subscription named {name!r}")
        delivered, failed, changes = row
        oldest_age_s = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
        return Stats(backlog, in_flight, delayed, dead, oldest_age_s, delivered, failed, changes)

    # -- dead letters -----------------------------------------------------------------------------

    async def dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        return await self._run(self._dead_letters, name, limit)

    def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        return [
            DeadLetter(seq, mark_replay(body, replay), attempts, last_error, dead_at, json.loads(context))
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
