"""The PostgreSQL `EventStore`, part 2: the log. An append stores new events (repeats of source+id take no
sequence) and queues each for every subscription the fan-out names (router.fanout), in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from router.cloudevents import Encoded
from router.fanout import Catalog, Grant, Handoffs
from router.persistence import Appended, Message
from router.receipts import new_nonce, receipt_for
from router.stores.postgres.core import PostgresCore, Tx, shard
from router.stores.postgres.partitions import day_of


class PostgresLog(PostgresCore):
    async def append(self, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        if day_of(now_ms) not in self._days:  # made first: a failed insert would spend sequence numbers
            async with self._connection() as conn:
                await self._ensure_days(conn, {day_of(now_ms)})
        try:
            return await self._write(now_ms, self._append_in, events, now_ms)
        except SeenThenForgotten:
            return await self._write(now_ms, self._append_in, events, now_ms)

    async def _append_in(self, tx: Tx, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        """Append `events` and fan them out, inside `tx` (which must have its transaction id already: see
        `_transaction`). One statement stores the new events, stamped with the catalog version they are fanned
        out against, and reads that version (and the subscriptions, when this replica's copy is older). The
        fan-out against this replica's copy goes with it: when the statement reads that very version (nearly
        always), it queues the messages and moves their counters too, and a publish is that one statement
        between BEGIN and COMMIT. Otherwise a second statement queues them against the catalog it read."""
        conn = tx.conn
        cached = self._fanout.catalog
        # Counters the transaction moved already are added at its commit, all in one statement and one order (two
        # writers never wait on each other's rows in opposite orders): this append's then go with them.
        plan = self._plan(tx, cached, events, now_ms) if not tx.effects.deltas else _Plan()
        rows = await conn.fetch(
            APPEND,
            [e["source"] for e, _ in events],
            [e["id"] for e, _ in events],
            [e["type"] for e, _ in events],
            [_key(e) for e, _ in events],
            [body for _, body in events],
            now_ms,
            cached.version,
            plan.subs,
            plan.ords,
            plan.visible,
            plan.attempts,
            plan.nonces,
            plan.holders,
            shard(),
        )
        new = {(r["source"], r["id"]): r["seq"] for r in rows}
        known: dict[tuple[str, str], int] = {}
        if len(new) < len({(e["source"], e["id"]) for e, _ in events}):
            missing = [(e["source"], e["id"]) for e, _ in events if (e["source"], e["id"]) not in new]
            known = {
                (r["source"], r["id"]): r["seq"]
                for r in await conn.fetch(
                    "SELECT k.source, k.id, k.seq FROM event_ids k JOIN unnest($1::text[], $2::text[]) AS t(source, id)"
                    " ON k.source = t.source AND k.id = t.id",
                    [s for s, _ in missing],
                    [i for _, i in missing],
                )
            }
        results: list[Appended] = []
        fresh: list[tuple[Encoded, int]] = []
        seen: dict[tuple[str, str], int] = {}
        for encoded in events:
            event = encoded.event
            key = (event["source"], event["id"])
            if key in seen:  # a repeat inside this batch, or of an event stored before
                results.append(Appended(event["id"], seen[key], duplicate=True))
            elif key in new:
                seen[key] = new[key]
                results.append(Appended(event["id"], new[key], duplicate=False))
                fresh.append((encoded, new[key]))
            elif key in known:
                seen[key] = known[key]
                results.append(Appended(event["id"], known[key], duplicate=True))
            else:  # its key went with a retention purge between the two reads: it is new again, next time
                raise SeenThenForgotten(key)
        if fresh and plan.made and rows[0]["fanned_out"]:
            self._planned_done(tx, plan, events, rows[0], now_ms)
        else:
            # Nothing planned was queued: the slots granted for it are free again.
            self._fanout.rolled_back(_withdrawn(tx, plan.placeholders))
            if fresh:
                version, subs = rows[0]["version"], rows[0]["subs"]
                # The subscriptions as of this statement's snapshot: this replica's copy, or the ones read with it.
                catalog = (
                    cached
                    if subs is None
                    else self._fanout.at(version, lambda: self._specs.subscriptions(_subscription_rows(subs)))
                )
                await self._enqueue_new(tx, catalog, fresh, now_ms)
        return results

    def _plan(self, tx: Tx, catalog: Catalog, events: Sequence[Encoded], now_ms: int) -> _Plan:
        """The fan-out of `events` against `catalog`, by position. Slots granted for hand-offs are counted in the
        transaction's `handoffs` at once (as in `_enqueue_new`), so a rollback frees them."""
        plan = _Plan(made=True)
        for ord, (event, body) in enumerate(events, start=1):
            for sub, grant in self._fanout.targets(catalog, event):
                name = sub.spec.name
                plan.subs.append(name)
                plan.ords.append(ord)
                plan.visible.append(now_ms if grant is None else now_ms + grant.lease_ms)
                plan.attempts.append(0 if grant is None else 1)
                plan.nonces.append(None if grant is None else plan.nonce)
                plan.holders.append(None if grant is None else self.replica_id)
                if grant is not None:
                    plan.grant_of[(name, ord)] = grant
                    plan.placeholders.setdefault(grant, []).append(Message("", 1, 0, body, now_ms))
        for grant, placeholders in plan.placeholders.items():
            tx.effects.handoffs.setdefault(grant, []).extend(placeholders)
        return plan

    def _planned_done(self, tx: Tx, plan: _Plan, events: Sequence[Encoded], row: Any, now_ms: int) -> None:
        """The append's statement queued the planned fan-out and moved its counters: what the transaction tells
        and hands off after its commit."""
        effects = tx.effects
        for name, queued, held in zip(row["queued_subs"], row["queued"], row["leased"], strict=True):
            effects.touched.add(name)
            effects.counted.add(name)
            if queued > held:
                effects.ready.add(name)
        granted = _withdrawn(tx, plan.placeholders)
        handed: Handoffs = {}
        for name, msg_id, ord, seq in zip(
            row["leased_subs"], row["leased_ids"], row["leased_ords"], row["leased_seqs"], strict=True
        ):
            grant = plan.grant_of[(name, ord)]
            handed.setdefault(grant, []).append(
                Message(receipt_for(msg_id, plan.nonce), 1, seq, events[ord - 1].body, now_ms)
            )
            effects.hide(name, now_ms + grant.lease_ms)
        for grant, messages in handed.items():
            effects.handoffs.setdefault(grant, []).extend(messages)
        # Slots granted for a subscription deleted meanwhile or for a repeat (nothing was queued) are free again.
        self._fanout.rolled_back({grant: msgs[len(handed.get(grant, ())) :] for grant, msgs in granted.items()})

    async def _enqueue_new(self, tx: Tx, catalog: Catalog, fresh: list[tuple[Encoded, int]], now_ms: int) -> None:
        subs: list[str] = []
        seqs: list[int] = []
        keys: list[str | None] = []
        visible: list[int] = []
        attempts: list[int] = []
        nonces: list[str | None] = []
        holders: list[str | None] = []
        grant_of: dict[tuple[str, int], Grant] = {}
        bodies: dict[int, bytes] = {}
        effects = tx.effects
        nonce = new_nonce()
        for (event, body), seq in fresh:
            for sub, grant in self._fanout.targets(catalog, event):
                name = sub.spec.name
                subs.append(name)
                seqs.append(seq)
                keys.append(_key(event))
                # An idle dispatcher or a waiting stream granted a slot: the message is leased in this very
                # transaction (attempt 1, hidden for the grant's lease, held by this replica) and handed to it after
                # the commit (router.fanout). Counted in `handoffs` now, so a rollback frees the slot.
                leased = grant is not None
                visible.append(now_ms + grant.lease_ms if grant is not None else now_ms)
                attempts.append(1 if leased else 0)
                nonces.append(nonce if leased else None)
                holders.append(self.replica_id if leased else None)
                if grant is not None:
                    grant_of[(name, seq)] = grant
                    effects.handoffs.setdefault(grant, []).append(Message("", 1, seq, body, now_ms))
                    bodies[seq] = body
        if not subs:
            return
        rows = await tx.conn.fetch(ENQUEUE, subs, seqs, keys, visible, attempts, nonces, holders, now_ms)
        granted, effects.handoffs = effects.handoffs, {}
        for row in rows:
            name = row["sub"]
            effects.count(name, messages=row["queued"])
            if row["queued"] > len(row["leased"]):
                effects.ready.add(name)
            for msg_id, seq in zip(row["leased"], row["leased_seqs"], strict=True):
                grant = grant_of[(name, seq)]
                effects.handoffs.setdefault(grant, []).append(
                    Message(receipt_for(msg_id, nonce), 1, seq, bodies[seq], now_ms)
                )
                effects.hide(name, now_ms + grant.lease_ms)
        # Slots granted for a subscription deleted meanwhile (nothing was queued for it) are free again.
        self._fanout.rolled_back(
            {grant: msgs[len(effects.handoffs.get(grant, ())) :] for grant, msgs in granted.items()}
        )


@dataclass
class _Plan:
    """An append's fan-out against this replica's copy of the catalog, sent with its statement (which queues it if
    that copy is the one it reads): one row per event and subscription, the event named by its position."""

    subs: list[str] = field(default_factory=list)
    ords: list[int] = field(default_factory=list)
    visible: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    nonces: list[str | None] = field(default_factory=list)
    holders: list[str | None] = field(default_factory=list)
    grant_of: dict[tuple[str, int], Grant] = field(default_factory=dict)
    """The grant of each message leased for a hand-off, by subscription and position."""
    placeholders: Handoffs = field(default_factory=dict)
    """A stand-in per slot granted, in the transaction's `handoffs` until the statement says what was leased."""
    nonce: str = field(default_factory=new_nonce)
    made: bool = False
    """False: no fan-out was sent along (the append's messages are queued by a statement of their own)."""


def _withdrawn(tx: Tx, placeholders: Handoffs) -> Handoffs:
    """Take `placeholders` (these very messages) out of the transaction's hand-offs, and return them."""
    for grant, messages in placeholders.items():
        taken = {id(m) for m in messages}
        held = [m for m in tx.effects.handoffs.get(grant, ()) if id(m) not in taken]
        if held:
            tx.effects.handoffs[grant] = held
        else:
            tx.effects.handoffs.pop(grant, None)
    return placeholders


class SeenThenForgotten(Exception):
    """An event's key was there when the append looked for repeats and gone when it read their sequences."""


APPEND = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[])
        WITH ORDINALITY AS t(source, id, type, pkey, body, ord)
), firsts AS (
    SELECT DISTINCT ON (source, id) * FROM input ORDER BY source, id, ord
), cat AS MATERIALIZED (
    SELECT version FROM catalog
), keys AS (
    -- Repeats seen already take no sequence number; a concurrent one is caught by the unique index.
    INSERT INTO event_ids (source, id, seq, appended_at)
    SELECT f.source, f.id, nextval('event_seq'), $6 FROM firsts f
    WHERE NOT EXISTS (SELECT 1 FROM event_ids k WHERE k.source = f.source AND k.id = f.id)
    ORDER BY f.ord
    ON CONFLICT DO NOTHING
    RETURNING source, id, seq
), stored AS (
    INSERT INTO events (seq, catalog_version, source, id, type, partitionkey, appended_at, body)
    SELECT k.seq, (SELECT version FROM cat), f.source, f.id, f.type, f.pkey, $6, f.body
    FROM keys k JOIN firsts f ON f.source = k.source AND f.id = k.id
), live AS MATERIALIZED (
    -- The fan-out sent along ($8-$13) holds if the catalog read is the one it was planned against. A subscription
    -- being deleted meanwhile waits for this transaction (or this one skips it): no message outlives it.
    SELECT name FROM subscriptions
    WHERE name = ANY($8::text[]) AND (SELECT version FROM cat) IS NOT DISTINCT FROM $7::bigint
    ORDER BY name FOR KEY SHARE
), queued AS (
    INSERT INTO messages (sub, seq, pkey, enqueued_at, visible_at, attempts, nonce, holder)
    SELECT m.sub, k.seq, f.pkey, $6, m.visible_at, m.attempts, m.nonce, m.holder
    FROM unnest($8::text[], $9::bigint[], $10::bigint[], $11::int[], $12::text[], $13::text[])
        WITH ORDINALITY AS m(sub, ord, visible_at, attempts, nonce, holder, n)
    JOIN firsts f ON f.ord = m.ord JOIN keys k ON k.source = f.source AND k.id = f.id
    WHERE m.sub IN (SELECT name FROM live)
    ORDER BY m.n
    RETURNING msg_id, sub, seq, nonce
), per_sub AS (
    SELECT sub, count(*) AS queued, count(nonce) AS leased FROM queued GROUP BY sub
), counted AS (
    -- In one order for every writer (see `PostgresCore._add_counters`).
    INSERT INTO counters AS c (sub, shard, messages, changes)
    SELECT sub, $14, queued, 1 FROM per_sub ORDER BY sub
    ON CONFLICT (sub, shard) DO UPDATE SET messages = c.messages + EXCLUDED.messages, changes = c.changes + 1
)
SELECT k.source, k.id, k.seq, c.version,
    CASE WHEN c.version IS DISTINCT FROM $7::bigint THEN (
        SELECT COALESCE(json_agg(json_build_array(s.name, s.spec, s.secret, s.created_at, s.start_seq)), '[]')::text
        FROM subscriptions s
    ) END AS subs,
    c.version IS NOT DISTINCT FROM $7::bigint AS fanned_out,
    q.queued_subs, q.queued, q.leased, l.leased_subs, l.leased_ids, l.leased_ords, l.leased_seqs
FROM keys k CROSS JOIN cat c
CROSS JOIN (
    SELECT COALESCE(array_agg(sub), '{}') AS queued_subs, COALESCE(array_agg(queued), '{}') AS queued,
        COALESCE(array_agg(leased), '{}') AS leased
    FROM per_sub
) q
CROSS JOIN (
    SELECT COALESCE(array_agg(q.sub ORDER BY q.msg_id), '{}') AS leased_subs,
        COALESCE(array_agg(q.msg_id ORDER BY q.msg_id), '{}') AS leased_ids,
        COALESCE(array_agg(f.ord ORDER BY q.msg_id), '{}') AS leased_ords,
        COALESCE(array_agg(q.seq ORDER BY q.msg_id), '{}') AS leased_seqs
    FROM queued q JOIN keys k ON k.seq = q.seq JOIN firsts f ON f.source = k.source AND f.id = k.id
    WHERE q.nonce IS NOT NULL
) l
"""
"""Store new events (skipping repeats of source+id), read the catalog they are fanned out against, and queue the
fan-out planned against this replica's copy of it, with its counters, if that is the one read."""

ENQUEUE = """
WITH live AS MATERIALIZED (
    -- A subscription being deleted meanwhile waits for this transaction (or this one skips it), so no message
    -- outlives its subscription.
    SELECT name FROM subscriptions WHERE name = ANY($1::text[]) ORDER BY name FOR KEY SHARE
), queued AS (
    INSERT INTO messages (sub, seq, pkey, enqueued_at, visible_at, attempts, nonce, holder)
    SELECT m.sub, m.seq, m.pkey, $8, m.visible_at, m.attempts, m.nonce, m.holder
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::int[], $6::text[], $7::text[])
        AS m(sub, seq, pkey, visible_at, attempts, nonce, holder)
    WHERE m.sub IN (SELECT name FROM live)
    RETURNING msg_id, sub, seq, nonce
)
SELECT sub, count(*) AS queued,
    COALESCE(array_agg(msg_id ORDER BY msg_id) FILTER (WHERE nonce IS NOT NULL), '{}') AS leased,
    COALESCE(array_agg(seq ORDER BY msg_id) FILTER (WHERE nonce IS NOT NULL), '{}') AS leased_seqs
FROM queued GROUP BY sub
"""
"""Queue messages for live subscriptions; per subscription, how many, and which were leased for a hand-off."""


def _subscription_rows(text: str | None) -> list[tuple[str, str, str, int, int]]:
    """The subscriptions the append's statement read with its snapshot, as a JSON array of rows."""
    rows: list[tuple[str, str, str, int, int]] = json.loads(text or "null") or []
    return rows


def _key(event: dict[str, Any]) -> str | None:
    key = event.get("partitionkey")
    return None if key is None else str(key)
