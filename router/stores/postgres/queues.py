"""The PostgreSQL `EventStore`, part 2: queue receives, push leases, outcomes, stats and dead letters.

Claims are one statement each: a MATERIALIZED CTE picks the first visible messages `FOR UPDATE SKIP
LOCKED` (so competing replicas never hold one message at once, and the planner cannot fold the pick
into the update, which Oban's authors warn about), the update leases them with a fresh nonce and the
counters move in the same statement. Acks, nacks, extensions and push outcomes take many receipts in
one statement. A message received `max_receive_count` times is dead-lettered in a transaction of its
own, with the announcement appended in it (router.dead_letters).

Stats never count the backlog: the subscription's message count is kept in `counters`, and only the
hidden messages (in flight or delayed, a few) are counted from the index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router import dead_letters
from router.persistence import DeadLetter, Message, ReceiptResult, Settlement, Stats
from router.receipts import STALE_RECEIPT, message_id_of, new_nonce, nonce_of, receipt_for
from router.replays import mark_replay
from router.stores.postgres.core import LEASE_LIMIT, Effects, Tx, shard
from router.stores.postgres.log import PostgresLog
from services.common.errors import NotFound

COUNT_CHANGE = """
    INSERT INTO counters AS c (sub, shard, messages, delivered, failed, changes)
    SELECT $1, {shard}, {messages}, {delivered}, {failed}, 1 WHERE {when}
    ON CONFLICT (sub, shard) DO UPDATE SET messages = c.messages + EXCLUDED.messages,
        delivered = c.delivered + EXCLUDED.delivered, failed = c.failed + EXCLUDED.failed, changes = c.changes + 1
"""
"""The counters part of a one-statement call (its subscription is always $1)."""


def _count(shard: str, when: str, messages: str = "0", delivered: str = "0", failed: str = "0") -> str:
    return COUNT_CHANGE.format(shard=shard, when=when, messages=messages, delivered=delivered, failed=failed)


LEASE = """
WITH picked AS MATERIALIZED (
    SELECT m.msg_id, m.visible_at AS was_visible_at FROM messages m
    WHERE m.sub = $1 AND m.visible_at <= $2 {held_back}
    ORDER BY m.visible_at, m.msg_id LIMIT $3
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE messages m SET nonce = $4, visible_at = $2 + $5, attempts = m.attempts + 1, holder = $6
    FROM picked p WHERE m.msg_id = p.msg_id AND m.attempts < $7
    RETURNING m.msg_id, m.seq, m.replay, m.attempts, m.enqueued_at, p.was_visible_at
), spent AS (
    SELECT m.msg_id, m.seq, m.replay, m.attempts, m.enqueued_at, p.was_visible_at, m.last_error
    FROM messages m JOIN picked p ON p.msg_id = m.msg_id WHERE m.attempts >= $7
), counted AS ({count})
SELECT l.msg_id, l.seq, l.replay, l.attempts, l.enqueued_at, l.was_visible_at, NULL::text AS last_error, e.body,
    false AS spent
FROM leased l JOIN events e ON e.seq = l.seq
UNION ALL
SELECT s.msg_id, s.seq, s.replay, s.attempts, s.enqueued_at, s.was_visible_at, s.last_error, e.body, true
FROM spent s JOIN events e ON e.seq = s.seq
"""
# Ordered push: only the oldest pending message of each partition key may go out, and not while it is itself in
# flight or waiting to be retried (it still exists then, holding back the rest); events without a key are not held.
# Two replicas leasing at once: a head one of them has locked is skipped by the other, and the key's next message is
# not eligible while that head exists, so a key is never in flight twice.
HELD_BACK = (
    "AND (m.pkey IS NULL OR NOT EXISTS (SELECT 1 FROM messages o"
    " WHERE o.sub = m.sub AND o.pkey = m.pkey AND o.seq < m.seq))"
)
LEASE_ANY = LEASE.format(held_back="", count=_count("$8", "EXISTS (SELECT 1 FROM leased)"))
LEASE_ORDERED = LEASE.format(held_back=HELD_BACK, count=_count("$8", "EXISTS (SELECT 1 FROM leased)"))

RECEIPTS = "unnest($2::bigint[], $3::text[]) AS r(id, nonce)"
OF_SUB = "(m.sub = $1) IS TRUE"
"""The receipt's subscription, checked on the row found by its id, never used to find it: the planner's statistics lag
behind a subscription made or filled since the last ANALYZE, and with them it would walk the subscription's whole
`(sub, visible_at)` index to find a few receipts (~60 ms a call with 75,000 queued; bench/README.md). `IS TRUE` makes
the test one no index can serve."""


def _matches(ids: str) -> str:
    """A receipt's message, found by id through the array `ids` (an index lookup in any plan, where a join with the
    receipts could be planned as a scan of `messages`), then checked for its nonce and subscription."""
    return f"m.msg_id = ANY({ids}::bigint[]) AND m.msg_id = r.id AND m.nonce = r.nonce AND {OF_SUB}"


MATCHES = _matches("$2")

ACKED = "(SELECT count(*) FROM acked)"
ACK = f"""
WITH acked AS (
    DELETE FROM messages m USING {RECEIPTS} WHERE {MATCHES} RETURNING m.msg_id
), counted AS ({_count("$4", "EXISTS (SELECT 1 FROM acked)", "-" + ACKED, ACKED)})
SELECT msg_id FROM acked
"""

NACK = f"""
WITH released AS (
    UPDATE messages m SET nonce = NULL, holder = NULL, visible_at = $5, last_error = COALESCE($6, m.last_error)
    FROM {RECEIPTS} WHERE {MATCHES} RETURNING m.msg_id
), counted AS ({_count("$4", "EXISTS (SELECT 1 FROM released)", failed="(SELECT count(*) FROM released)")})
SELECT msg_id FROM released
"""

EXTEND = f"""
WITH extended AS (
    UPDATE messages m SET visible_at = $5 FROM {RECEIPTS} WHERE {MATCHES} RETURNING m.msg_id
), counted AS ({_count("$4", "EXISTS (SELECT 1 FROM extended)")})
SELECT msg_id FROM extended
"""

RELEASE = f"""
WITH released AS (
    UPDATE messages m SET nonce = NULL, holder = NULL, visible_at = $5, attempts = GREATEST(m.attempts - 1, 0)
    FROM {RECEIPTS} WHERE {MATCHES} RETURNING m.msg_id
), counted AS ({_count("$4", "true")})
SELECT msg_id FROM released
"""

SETTLE = f"""
WITH acked AS (
    DELETE FROM messages m USING {RECEIPTS} WHERE {MATCHES} RETURNING m.msg_id
), retried AS (
    UPDATE messages m SET nonce = NULL, holder = NULL, visible_at = r.visible_at, last_error = r.error
    FROM unnest($5::bigint[], $6::text[], $7::bigint[], $8::text[]) AS r(id, nonce, visible_at, error)
    WHERE {_matches("$5")} RETURNING m.msg_id
), counted AS ({_count("$4", "true", "-" + ACKED, ACKED, "(SELECT count(*) FROM retried)")})
SELECT msg_id FROM acked UNION ALL SELECT msg_id FROM retried
"""

STATS = """
SELECT EXISTS (SELECT 1 FROM subscriptions WHERE name = $1) AS found, t.*, h.*,
    (SELECT enqueued_at FROM messages WHERE sub = $1 AND visible_at <= $2 ORDER BY visible_at, msg_id LIMIT 1)
        AS first_ready
FROM (
    SELECT COALESCE(sum(messages), 0)::bigint AS messages, COALESCE(sum(dead), 0)::bigint AS dead,
        COALESCE(sum(delivered), 0)::bigint AS delivered, COALESCE(sum(failed), 0)::bigint AS failed,
        COALESCE(sum(changes), 0)::bigint AS changes
    FROM counters WHERE sub = $1
) t, (
    SELECT count(*) FILTER (WHERE nonce IS NOT NULL) AS in_flight, count(*) FILTER (WHERE nonce IS NULL) AS delayed,
        min(enqueued_at) AS oldest_hidden
    FROM messages WHERE sub = $1 AND visible_at > $2
) h
"""
"""A subscription's numbers: its counters (a few rows), and the hidden messages counted from the index."""


@dataclass(frozen=True, slots=True)
class Burial:
    """A message to dead-letter: what the store needs to move it and announce it."""

    msg_id: int
    seq: int
    replay: str | None
    attempts: int
    reason: str
    context: dict[str, Any]
    body: bytes
    nonce: str | None = None
    """The receipt's nonce when a push outcome buries it (None: a queue message received too often)."""


class PostgresQueues(PostgresLog):
    # -- queues and push leases --------------------------------------------------------------------

    async def receive(
        self, name: str, max_messages: int, visibility_timeout_ms: int, now_ms: int, max_receive_count: int
    ) -> list[Message]:
        return await self._lease(name, max_messages, visibility_timeout_ms, now_ms, max_receive_count, False)

    async def lease(self, name: str, max_messages: int, lease_ms: int, now_ms: int, ordered: bool) -> list[Message]:
        return await self._lease(name, max_messages, lease_ms, now_ms, None, ordered)

    async def _lease(
        self, name: str, max_messages: int, hide_ms: int, now_ms: int, max_receive_count: int | None, ordered: bool
    ) -> list[Message]:
        messages: list[tuple[int, int, Message]] = []
        while len(messages) < max_messages:
            nonce = new_nonce()
            async with self._connection(bookkeeping=True) as conn:
                rows = await conn.fetch(
                    LEASE_ORDERED if ordered else LEASE_ANY,
                    name,
                    now_ms,
                    max_messages - len(messages),
                    nonce,
                    hide_ms,
                    self.replica_id,
                    max_receive_count if max_receive_count is not None else LEASE_LIMIT,
                    shard(),
                )
            leased = [
                (
                    r["was_visible_at"],
                    r["msg_id"],
                    Message(
                        receipt_for(r["msg_id"], nonce),
                        r["attempts"],
                        r["seq"],
                        mark_replay(r["body"], r["replay"]),
                        r["enqueued_at"],
                        r["replay"],
                    ),
                )
                for r in rows
                if not r["spent"]
            ]
            if leased:
                effects = Effects()
                effects.hide(name, now_ms + hide_ms)
                self._published(effects)
            messages.extend(leased)
            spent = [r for r in rows if r["spent"]]
            if not spent:
                break
            burials = []
            for r in spent:
                verdict = dead_letters.over_receive_limit(r["attempts"], max_receive_count, r["last_error"])
                assert verdict is not None  # the statement's `attempts >= max_receive_count` is that rule
                burials.append(
                    Burial(
                        r["msg_id"], r["seq"], r["replay"], r["attempts"], verdict.reason, verdict.context, r["body"]
                    )
                )
            if not await self._write(now_ms, self._bury, name, burials, now_ms, max_receive_count, bookkeeping=True):
                break  # claimed or settled elsewhere meanwhile: what is left is for the next receive
        return [message for _, _, message in sorted(messages, key=lambda m: (m[0], m[1]))]

    async def _bury(
        self, tx: Tx, sub: str, burials: Sequence[Burial], now_ms: int, max_receive_count: int | None = None
    ) -> set[int]:
        """Move messages to the dead letters and announce each (in `tx`); a message claimed or settled meanwhile
        is left alone. Returns the ids of those buried."""
        if not burials:
            return set()
        gone = {
            row["msg_id"]
            for row in await tx.conn.fetch(
                "DELETE FROM messages m USING unnest($2::bigint[], $3::text[]) AS r(id, nonce)"
                f" WHERE m.msg_id = ANY($2::bigint[]) AND m.msg_id = r.id AND {OF_SUB}"
                " AND CASE WHEN $4::int IS NULL THEN m.nonce = r.nonce ELSE m.attempts >= $4 AND m.visible_at <= $5 END"
                " RETURNING m.msg_id",
                sub,
                [b.msg_id for b in burials],
                [b.nonce for b in burials],
                max_receive_count,
                now_ms,
            )
        }
        buried = [b for b in burials if b.msg_id in gone]
        if not buried:
            return gone
        await tx.conn.execute(
            "INSERT INTO dead_letters (sub, seq, replay, attempts, last_error, context, dead_at)"
            " SELECT $1, seq, replay, attempts, last_error, context, $2"
            " FROM unnest($3::bigint[], $4::text[], $5::int[], $6::text[], $7::text[])"
            " AS t(seq, replay, attempts, last_error, context)",
            sub,
            now_ms,
            [b.seq for b in buried],
            [b.replay for b in buried],
            [b.attempts for b in buried],
            [b.reason for b in buried],
            [json.dumps(b.context) for b in buried],
        )
        tx.effects.count(sub, messages=-len(buried), dead=len(buried), failed=len(buried))
        announcements = [
            dead_letters.announcement(sub, b.msg_id, b.body, b.attempts, b.reason, b.context) for b in buried
        ]
        await self._append_in(tx, announcements, now_ms)
        return gone

    async def settle(self, name: str, settlements: Sequence[Settlement], now_ms: int) -> list[ReceiptResult]:
        acks = [s for s in settlements if s.kind == "ack"]
        retries = [s for s in settlements if s.kind == "retry"]
        deads = [s for s in settlements if s.kind == "dead"]
        args = (
            name,
            [message_id_of(s.receipt) for s in acks],
            [nonce_of(s.receipt) for s in acks],
            shard(),
            [message_id_of(s.receipt) for s in retries],
            [nonce_of(s.receipt) for s in retries],
            [now_ms + s.delay_ms for s in retries],
            [s.error for s in retries],
        )
        if deads:
            done = await self._write(now_ms, self._settle_with_deaths, name, args, deads, now_ms, bookkeeping=True)
        else:
            async with self._connection(bookkeeping=True) as conn:
                done = {row["msg_id"] for row in await conn.fetch(SETTLE, *args)}
            effects = Effects()
            effects.touched.add(name)
            self._published_retries(effects, name, retries, done, now_ms)
            self._published(effects)
        return [_result(s.receipt, message_id_of(s.receipt) in done) for s in settlements]

    async def _settle_with_deaths(
        self, tx: Tx, name: str, args: tuple[Any, ...], deads: list[Settlement], now_ms: int
    ) -> set[int]:
        done = {row["msg_id"] for row in await tx.conn.fetch(SETTLE, *args)}
        tx.effects.touched.add(name)
        for msg_id, visible_at in zip(args[4], args[6], strict=True):
            if msg_id in done:
                tx.effects.hide(name, visible_at)
        rows = await tx.conn.fetch(
            "SELECT m.msg_id, m.seq, m.replay, m.attempts, e.body FROM messages m JOIN events e ON e.seq = m.seq"
            f" JOIN {RECEIPTS} ON {MATCHES}",
            name,
            [message_id_of(s.receipt) for s in deads],
            [nonce_of(s.receipt) for s in deads],
        )
        found = {r["msg_id"]: r for r in rows}
        burials = [
            Burial(r["msg_id"], r["seq"], r["replay"], r["attempts"], s.error or "", s.context or {}, r["body"], nonce)
            for s in deads
            if (r := found.get(message_id_of(s.receipt))) is not None and (nonce := nonce_of(s.receipt))
        ]
        return done | await self._bury(tx, name, burials, now_ms)

    def _published_retries(
        self, effects: Effects, name: str, retries: list[Settlement], done: set[int], now_ms: int
    ) -> None:
        for s in retries:
            if message_id_of(s.receipt) in done:
                effects.hide(name, now_ms + s.delay_ms)

    async def release(self, name: str, receipts: Sequence[str], now_ms: int) -> None:
        await self._by_receipts(RELEASE, name, receipts, now_ms, bookkeeping=True)
        effects = Effects()
        effects.touched.add(name)
        effects.ready.add(name)
        self._published(effects)

    async def release_leases(self, name: str, now_ms: int) -> int:
        """This replica's live leases of a push subscription, visible now: its dispatcher is starting, so none of
        them is being delivered any more. Another holder's are left alone until they expire."""
        async with self._connection(bookkeeping=True) as conn:
            count: int = await conn.fetchval(
                "WITH released AS (UPDATE messages SET nonce = NULL, holder = NULL, visible_at = $2"
                " WHERE sub = $1 AND holder = $3 AND nonce IS NOT NULL AND visible_at > $2 RETURNING msg_id),"
                f" counted AS ({_count('$4', 'EXISTS (SELECT 1 FROM released)')})"
                " SELECT count(*) FROM released",
                name,
                now_ms,
                self.replica_id,
                shard(),
            )
        if count:
            effects = Effects()
            effects.touched.add(name)
            effects.ready.add(name)
            self._published(effects)
        return count

    async def ack(self, name: str, receipts: Sequence[str], now_ms: int) -> list[ReceiptResult]:
        done = await self._by_receipts(ACK, name, receipts)
        if done:
            effects = Effects()
            effects.touched.add(name)
            self._published(effects)
        return [_result(r, message_id_of(r) in done) for r in receipts]

    async def nack(
        self, name: str, receipts: Sequence[str], delay_ms: int, now_ms: int, error: str | None = None
    ) -> list[ReceiptResult]:
        # The lease ends (the receipt dies) and the message waits `delay_ms` as delayed.
        done = await self._by_receipts(NACK, name, receipts, now_ms + delay_ms, error)
        if done:
            effects = Effects()
            if delay_ms > 0:
                effects.hide(name, now_ms + delay_ms)
            else:
                effects.touched.add(name)
                effects.ready.add(name)
            self._published(effects)
        return [_result(r, message_id_of(r) in done) for r in receipts]

    async def extend(
        self, name: str, receipts: Sequence[str], visibility_timeout_ms: int, now_ms: int
    ) -> list[ReceiptResult]:
        # The lease is kept and its visibility timeout pushed out from now, as SQS does.
        done = await self._by_receipts(EXTEND, name, receipts, now_ms + visibility_timeout_ms)
        if done:
            effects = Effects()
            effects.hide(name, now_ms + visibility_timeout_ms)
            self._published(effects)
        return [_result(r, message_id_of(r) in done) for r in receipts]

    async def _by_receipts(
        self, sql: str, name: str, receipts: Sequence[str], *more: Any, bookkeeping: bool = False
    ) -> set[int]:
        async with self._connection(bookkeeping=bookkeeping) as conn:
            rows = await conn.fetch(
                sql, name, [message_id_of(r) for r in receipts], [nonce_of(r) for r in receipts], shard(), *more
            )
        return {row["msg_id"] for row in rows}

    async def next_visible_ms(self, name: str, now_ms: int) -> int | None:
        async with self._connection() as conn:
            at = await conn.fetchval(
                "SELECT min(visible_at) FROM messages WHERE sub = $1 AND visible_at > $2", name, now_ms
            )
        return int(at) if at is not None else None

    async def stats(self, name: str, now_ms: int) -> Stats:
        async with self._connection() as conn:
            row = await conn.fetchrow(STATS, name, now_ms)
        assert row is not None
        if not row["found"]:  # deleted between the bus's look-up and this read
            raise NotFound(f"no subscription named {name!r}")
        in_flight, delayed = row["in_flight"], row["delayed"]
        oldest = min((at for at in (row["oldest_hidden"], row["first_ready"]) if at is not None), default=None)
        oldest_age_s = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
        backlog = max(0, row["messages"] - in_flight - delayed)
        return Stats(
            backlog, in_flight, delayed, row["dead"], oldest_age_s, row["delivered"], row["failed"], row["changes"]
        )

    # -- dead letters -----------------------------------------------------------------------------

    async def dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT d.seq, d.replay, e.body, d.attempts, d.last_error, d.context, d.dead_at FROM dead_letters d"
                " JOIN events e ON e.seq = d.seq WHERE d.sub = $1 ORDER BY d.dl_id LIMIT $2",
                name,
                limit,
            )
        return [
            DeadLetter(
                r["seq"],
                mark_replay(r["body"], r["replay"]),
                r["attempts"],
                r["last_error"],
                r["dead_at"],
                json.loads(r["context"]),
            )
            for r in rows
        ]

    async def redrive(self, name: str, now_ms: int) -> int:
        return await self._write(now_ms, self._redrive, name, now_ms)

    async def _redrive(self, tx: Tx, name: str, now_ms: int) -> int:
        count: int = await tx.conn.fetchval(
            "WITH live AS (SELECT name FROM subscriptions WHERE name = $1 FOR KEY SHARE),"
            " moved AS (DELETE FROM dead_letters d WHERE d.sub IN (SELECT name FROM live)"
            " RETURNING d.dl_id, d.sub, d.seq, d.replay),"
            " queued AS (INSERT INTO messages (sub, seq, pkey, replay, enqueued_at, visible_at)"
            " SELECT m.sub, m.seq, e.partitionkey, m.replay, $2, $2 FROM moved m JOIN events e ON e.seq = m.seq"
            " ORDER BY m.dl_id RETURNING 1)"
            " SELECT count(*) FROM queued",
            name,
            now_ms,
        )
        if count:
            tx.effects.count(name, messages=count, dead=-count)
            tx.effects.ready.add(name)
        return count

    async def purge_dead_letters(self, name: str) -> int:
        async with self._transaction() as tx:
            count: int = await tx.conn.fetchval(
                "WITH gone AS (DELETE FROM dead_letters WHERE sub = $1 RETURNING 1) SELECT count(*) FROM gone", name
            )
            if count:
                tx.effects.count(name, dead=-count)
        return count


def _result(receipt: str, ok: bool) -> ReceiptResult:
    return ReceiptResult(receipt, ok, None if ok else STALE_RECEIPT)
