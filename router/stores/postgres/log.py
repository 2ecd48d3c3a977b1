"""The PostgreSQL `EventStore`, part 2: the log. An append stores new events (repeats of source+id take no
sequence) and queues each for every subscription the fan-out names (router.fanout), in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from router.cloudevents import Encoded
from router.fanout import Catalog, Grant
from router.persistence import Appended, Message, Subscription, spec_from_json
from router.receipts import new_nonce, receipt_for
from router.stores.postgres.core import PostgresCore, Tx
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
        out against, and reads that version (and the subscriptions, when this replica's copy is older); a
        second queues the messages."""
        conn = tx.conn
        cached = self._fanout.catalog
        rows = await conn.fetch(
            APPEND,
            [e["source"] for e, _ in events],
            [e["id"] for e, _ in events],
            [e["type"] for e, _ in events],
            [_key(e) for e, _ in events],
            [body for _, body in events],
            now_ms,
            cached.version,
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
        if fresh:
            version, subs = rows[0]["version"], rows[0]["subs"]
            # The subscriptions as of this statement's snapshot: this replica's copy, or the ones read with it.
            catalog = cached if subs is None else self._fanout.at(version, lambda: _subscriptions_from_json(subs))
            await self._enqueue_new(tx, catalog, fresh, now_ms)
        return results

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
)
SELECT k.source, k.id, k.seq, c.version,
    CASE WHEN c.version IS DISTINCT FROM $7::bigint THEN (
        SELECT COALESCE(json_agg(json_build_array(s.name, s.spec, s.secret, s.created_at, s.start_seq)), '[]')::text
        FROM subscriptions s
    ) END AS subs
FROM keys k CROSS JOIN cat c
"""
"""Store new events (skipping repeats of source+id) and read the catalog they are fanned out against."""

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


def _key(event: dict[str, Any]) -> str | None:
    key = event.get("partitionkey")
    return None if key is None else str(key)


def _subscriptions_from_json(text: str | None) -> list[Subscription]:
    return [
        Subscription(spec_from_json(name, spec), secret, created_at, start_seq)
        for name, spec, secret, created_at, start_seq in json.loads(text or "null") or []
    ]
