"""The PostgreSQL `EventStore`, part 3: subscriptions, their start positions, replays.

A new subscription must get every event from its start position on, while other replicas append
without waiting for it: nothing serializes appenders here (a lock every append takes would cost them
2-6x, issue 11's research). Each event records the catalog version its appender fanned it out against
(`catalog_version`) and its transaction (`txid`), and each appender takes its transaction id before it
reads the catalog (`PostgresCore._transaction`). Then, for a subscription created at catalog version V
in snapshot S:

- an event whose appender read version V or later was queued for it by that appender;
- an event with `catalog_version < V` that S sees is queued by the creating transaction itself;
- an event with `catalog_version < V` that S does not see was in flight during the creation: its
  appender took its transaction id before the creation committed, so it is below `catchup_after`, a
  transaction id taken once the creation had committed (ids are handed out in order). Not
  `pg_snapshot_xmax`: that is the last *completed* id + 1, and an appender that took its id after the
  creation's and was still running may be above it (its event was lost so, once in CI). When the
  horizon passes that id
  (`pg_snapshot_xmin(pg_current_snapshot()) >= catchup_after`) every such appender has ended, and the
  catch-up queues the ones S did not see (`pg_visible_in_snapshot`) in one transaction.

So no event is skipped for having committed late, and no identity order is trusted: sequence numbers
only filter by the start position, never decide what has committed. The catch-up runs on the replica's
notifications (any commit, and the periodic re-check), usually within milliseconds of the creation.

A replay reads what its statement sees: an event still in flight in its range is delivered to the
subscription as a new event when it commits (it is queued by its appender or by the catch-up above).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from router.persistence import (
    Replay,
    Subscription,
    SubscriptionSpec,
    over_subscription_limit,
    spec_from_json,
    spec_to_json,
)
from router.stores.postgres.core import Tx
from router.stores.postgres.queues import PostgresQueues
from services.common.errors import Conflict, NotFound, Unavailable

if TYPE_CHECKING:
    from router.stores.postgres.schema import Conn

log = logging.getLogger(__name__)

LOCKED_CATALOG = (
    "BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE catalog IN EXCLUSIVE MODE; SELECT pg_current_xact_id()"
)
"""Subscription changes take turns (appenders only read the catalog, which this lock lets them), and a creation
reads everything from one snapshot taken after the lock: the one it records for its catch-up."""
CATALOG_LOCKED = "BEGIN; LOCK TABLE catalog IN EXCLUSIVE MODE; SELECT pg_current_xact_id()"
PUT_ATTEMPTS = 5
CATCH_UP_EVERY_S = 0.1
"""At most this often, while a catch-up waits for the appenders that were in flight at a creation."""
ENQUEUE_CHUNK = 1000

CATCH_UP_EVENTS = """
SELECT e.seq, e.partitionkey, e.body FROM subscriptions s JOIN events e
    ON e.txid >= pg_snapshot_xmin(s.catchup_snapshot) AND e.txid < s.catchup_after
WHERE s.name = $1 AND NOT pg_visible_in_snapshot(e.txid, s.catchup_snapshot)
    AND e.catalog_version < s.created_version AND e.seq >= s.catchup_from
ORDER BY e.seq
"""
"""The events appended during a subscription's creation by appenders that did not see it."""


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class PostgresSubscriptions(PostgresQueues):
    _catch_up_task: asyncio.Task[None] | None = None
    _catch_up_again = False
    _catch_up_timer: asyncio.TimerHandle | None = None
    _catch_up_last = 0.0
    _pending: frozenset[str] = frozenset()
    """Subscriptions with a catch-up to finish, as last read."""

    # -- subscriptions ----------------------------------------------------------------------------

    async def put_subscription(
        self, spec: SubscriptionSpec, now_ms: int, *, max_subscriptions: int | None = None
    ) -> tuple[Subscription, bool]:
        for attempt in range(1, PUT_ATTEMPTS + 1):
            try:
                sub, created = await self._write(
                    now_ms, self._put_subscription, spec, now_ms, max_subscriptions, begin=LOCKED_CATALOG
                )
                break
            except asyncpg.SerializationError:
                # A row it changes was changed since its snapshot by what does not take the catalog lock: a
                # catch-up's bookkeeping on the subscription's row, a write racing an earlier namesake's deletion.
                # Read everything again.
                if attempt == PUT_ATTEMPTS:
                    raise
        if created:
            try:
                async with self._connection() as conn:
                    # The bound of the catch-up: every appender that read an older catalog took its transaction id
                    # before the creation committed, hence below the one this statement takes now.
                    await conn.execute(
                        "UPDATE subscriptions SET catchup_after = pg_current_xact_id()"
                        " WHERE name = $1 AND catchup_snapshot IS NOT NULL AND catchup_after IS NULL",
                        spec.name,
                    )
            except Unavailable as exc:  # the subscription exists: any later bound will do (see `catch_up`)
                log.warning("subscription %s: its catch-up is bounded later (%s)", spec.name, exc)
            self._pending = self._pending | {spec.name}
            self._catch_up_soon()
        return sub, created

    async def _put_subscription(
        self, tx: Tx, spec: SubscriptionSpec, now_ms: int, max_subscriptions: int | None
    ) -> tuple[Subscription, bool]:
        conn = tx.conn
        existing = await conn.fetchrow(
            "SELECT secret, created_at, start_seq FROM subscriptions WHERE name = $1", spec.name
        )
        version = await conn.fetchval("UPDATE catalog SET version = version + 1 RETURNING version")
        tx.effects.catalog = True
        if existing is not None:
            await conn.execute("UPDATE subscriptions SET spec = $2 WHERE name = $1", spec.name, spec_to_json(spec))
            return Subscription(spec, existing["secret"], existing["created_at"], existing["start_seq"]), False
        if max_subscriptions is not None:
            # Under the catalog lock (LOCKED_CATALOG), as every creation: two replicas never pass the bound together.
            count = await conn.fetchval("SELECT count(*) FROM subscriptions")
            if count >= max_subscriptions:
                raise over_subscription_limit(count, max_subscriptions)
        # What an earlier subscription of that name left behind (a write racing its deletion) goes first.
        await conn.execute(
            "WITH m AS (DELETE FROM messages WHERE sub = $1), d AS (DELETE FROM dead_letters WHERE sub = $1)"
            " DELETE FROM counters WHERE sub = $1",
            spec.name,
        )
        last = await conn.fetchval("SELECT COALESCE(max(seq), 0) FROM events")
        if isinstance(spec.start, int):
            start_seq = floor = spec.start
        else:
            start_seq, floor = {"latest": last + 1, "earliest": 0}[spec.start], 0
        sub = Subscription(spec, new_secret(), now_ms, start_seq)
        await conn.execute(
            "INSERT INTO subscriptions (name, spec, secret, created_at, start_seq, created_version, catchup_snapshot,"
            " catchup_from) VALUES ($1, $2, $3, $4, $5, $6, pg_current_snapshot(), $7)",
            spec.name,
            spec_to_json(spec),
            sub.secret,
            now_ms,
            start_seq,
            version,
            floor,
        )
        if start_seq <= last:
            await self._enqueue_retained(
                tx,
                spec,
                "SELECT seq, partitionkey, body FROM events WHERE seq >= $1 ORDER BY seq",
                [start_seq],
                None,
                now_ms,
            )
        return sub, True

    async def _enqueue_retained(
        self, tx: Tx, spec: SubscriptionSpec, query: str, args: list[Any], replay: str | None, now_ms: int
    ) -> int:
        """Queue the events `query` finds that match `spec` (read through a cursor, in chunks)."""
        total = 0
        chunk: list[tuple[int, str | None]] = []
        async for row in tx.conn.cursor(query, *args, prefetch=ENQUEUE_CHUNK):
            if spec.matches(json.loads(row["body"])):
                chunk.append((row["seq"], row["partitionkey"]))
                if len(chunk) >= ENQUEUE_CHUNK:
                    total += await self._insert_retained(tx, spec.name, chunk, replay, now_ms)
                    chunk = []
        total += await self._insert_retained(tx, spec.name, chunk, replay, now_ms)
        return total

    async def _insert_retained(
        self, tx: Tx, name: str, rows: list[tuple[int, str | None]], replay: str | None, now_ms: int
    ) -> int:
        if not rows:
            return 0
        await tx.conn.execute(
            "INSERT INTO messages (sub, seq, pkey, replay, enqueued_at, visible_at)"
            " SELECT $1, seq, pkey, $2, $3, $3 FROM unnest($4::bigint[], $5::text[]) AS t(seq, pkey)",
            name,
            replay,
            now_ms,
            [seq for seq, _ in rows],
            [key for _, key in rows],
        )
        tx.effects.count(name, messages=len(rows))
        tx.effects.ready.add(name)
        return len(rows)

    async def get_subscription(self, name: str) -> Subscription | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT spec, secret, created_at, start_seq FROM subscriptions WHERE name = $1", name
            )
        if row is None:
            return None
        return Subscription(spec_from_json(name, row["spec"]), row["secret"], row["created_at"], row["start_seq"])

    async def list_subscriptions(self) -> list[Subscription]:
        return (await self.load_subscriptions())[1]

    async def load_subscriptions(self) -> tuple[int, list[Subscription]]:
        async with self._connection() as conn:
            return await self._read_subscriptions(conn)

    async def delete_subscription(self, name: str) -> bool:
        # Takes the catalog lock first, as a creation does: a PUT and a DELETE of one name never wait on each other's
        # locks in opposite orders.
        return await self._write(0, self._delete_subscription, name, begin=CATALOG_LOCKED)

    async def _delete_subscription(self, tx: Tx, name: str) -> bool:
        conn = tx.conn
        if await conn.fetchval("DELETE FROM subscriptions WHERE name = $1 RETURNING 1", name) is None:
            return False
        await conn.execute(
            "WITH m AS (DELETE FROM messages WHERE sub = $1), d AS (DELETE FROM dead_letters WHERE sub = $1)"
            " DELETE FROM counters WHERE sub = $1",
            name,
        )
        await conn.execute("UPDATE catalog SET version = version + 1")
        tx.effects.catalog = True
        tx.effects.touched.add(name)
        tx.effects.deleted.add(name)
        return True

    # -- catch-ups --------------------------------------------------------------------------------

    def _heard(self, changes: Any) -> None:
        if changes.catalog or changes.everything:
            self._catch_up_soon(refresh=True)
        elif self._pending:
            self._catch_up_soon()

    async def _prepare(self, conn: Conn) -> None:
        await super()._prepare(conn)
        self._pending = await self._read_pending(conn)
        if self._pending:
            self._catch_up_soon()

    async def _read_pending(self, conn: Conn) -> frozenset[str]:
        rows = await conn.fetch("SELECT name FROM subscriptions WHERE catchup_snapshot IS NOT NULL")
        return frozenset(row["name"] for row in rows)

    def _catch_up_soon(self, *, refresh: bool = False) -> None:
        """Try the pending catch-ups, at most every CATCH_UP_EVERY_S, one try at a time."""
        if refresh:
            self._refresh_pending = True
        if self._catch_up_task is not None and not self._catch_up_task.done():
            self._catch_up_again = True
            return
        if self._catch_up_timer is not None or self._closing.is_set():
            return
        wait_s = self._catch_up_last + CATCH_UP_EVERY_S - time.monotonic()
        if wait_s > 0:
            self._catch_up_timer = asyncio.get_running_loop().call_later(wait_s, self._catch_up_now)
        else:
            self._catch_up_now()

    _refresh_pending = False

    def _catch_up_now(self) -> None:
        self._catch_up_timer = None
        self._catch_up_last = time.monotonic()
        self._catch_up_again = False
        self._catch_up_task = asyncio.get_running_loop().create_task(self._try_catch_ups(), name="router-catch-up")
        self._in_background(self._catch_up_task)
        self._catch_up_task.add_done_callback(self._after_catch_up)

    def _after_catch_up(self, task: asyncio.Task[None]) -> None:
        if self._catch_up_again and not self._closing.is_set():
            self._catch_up_soon()

    async def _try_catch_ups(self) -> None:
        try:
            await self.catch_up()
        except Unavailable as exc:
            log.debug("catch-up postponed: %s", exc)
        except Exception:
            log.exception("a subscription's catch-up failed; it is tried again on the next change")

    async def catch_up(self) -> list[str]:
        """Finish the catch-up of every new subscription whose concurrent appenders have all ended; returns the
        names of those finished. Any replica may do it: the subscription's row lock makes it happen once."""
        async with self._connection() as conn:
            if self._refresh_pending:
                self._refresh_pending = False
                self._pending = await self._read_pending(conn)
            checked = self._pending
            if not checked:
                return []
            rows = await conn.fetch(
                "SELECT name, catchup_after IS NULL AS unbounded,"
                " pg_snapshot_xmin(pg_current_snapshot()) >= catchup_after AS due"
                " FROM subscriptions WHERE name = ANY($1::text[]) AND catchup_snapshot IS NOT NULL",
                list(checked),
            )
            for row in rows:
                if row["unbounded"]:  # its creator stopped before bounding it: any later bound is as good
                    await conn.execute(
                        "UPDATE subscriptions SET catchup_after = pg_current_xact_id()"
                        " WHERE name = $1 AND catchup_after IS NULL",
                        row["name"],
                    )
        done = [name for name in [r["name"] for r in rows if r["due"]] if await self._write(0, self._catch_up, name)]
        # Those finished elsewhere or deleted drop out; those created meanwhile stay.
        self._pending = (self._pending - checked) | (frozenset(r["name"] for r in rows) - set(done))
        return done

    async def _catch_up(self, tx: Tx, name: str) -> bool:
        row = await tx.conn.fetchrow(
            "SELECT spec, created_version, catchup_snapshot::text AS snapshot, catchup_after::text AS after"
            " FROM subscriptions WHERE name = $1 AND catchup_snapshot IS NOT NULL"
            " AND pg_snapshot_xmin(pg_current_snapshot()) >= catchup_after FOR UPDATE",
            name,
        )
        if row is None:  # done by another replica, deleted, or not due after all
            return False
        spec = spec_from_json(name, row["spec"])
        count = await self._enqueue_retained(tx, spec, CATCH_UP_EVENTS, [name], None, int(time.time() * 1000))
        await tx.conn.execute(
            "UPDATE subscriptions SET catchup_snapshot = NULL, catchup_from = NULL, catchup_after = NULL"
            " WHERE name = $1",
            name,
        )
        if count:  # with what bounded it (the creation's version and snapshot, the first transaction id after it)
            log.info(
                "subscription %s caught up with %d event(s) appended while it was created"
                " (version %s, snapshot %s, before transaction %s)",
                name, count, row["created_version"], row["snapshot"], row["after"],
            )  # fmt: skip
        return True

    # -- replays ---------------------------------------------------------------------------------

    async def replay(self, name: str, replay: str, from_seq: int, to_seq: int, now_ms: int) -> Replay:
        return await self._write(now_ms, self._replay, name, replay, from_seq, to_seq, now_ms)

    async def _replay(self, tx: Tx, name: str, replay: str, from_seq: int, to_seq: int, now_ms: int) -> Replay:
        conn = tx.conn
        if await conn.fetchval("SELECT 1 FROM replays WHERE sub = $1 AND name = $2", name, replay):
            raise Conflict(f"subscription {name!r} already has a replay named {replay!r}")
        spec_text = await conn.fetchval("SELECT spec FROM subscriptions WHERE name = $1 FOR KEY SHARE", name)
        if spec_text is None:
            raise NotFound(f"no subscription named {name!r}")
        spec = spec_from_json(name, spec_text)
        total = await self._enqueue_retained(
            tx,
            spec,
            "SELECT seq, partitionkey, body FROM events WHERE seq >= $1 AND seq <= $2 ORDER BY seq",
            [from_seq, to_seq],
            replay,
            now_ms,
        )
        await conn.execute(
            "INSERT INTO replays (sub, name, from_seq, to_seq, total, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            name,
            replay,
            from_seq,
            to_seq,
            total,
            now_ms,
        )
        status = await self._replay_status(conn, name, replay)
        assert status is not None
        return status

    async def replay_status(self, name: str, replay: str) -> Replay | None:
        async with self._connection() as conn:
            return await self._replay_status(conn, name, replay)

    async def _replay_status(self, conn: Conn, name: str, replay: str) -> Replay | None:
        row = await conn.fetchrow(
            "SELECT r.from_seq, r.to_seq, r.total, r.created_at,"
            " (SELECT count(*) FROM messages WHERE sub = $1 AND replay = $2) AS pending,"
            " (SELECT count(*) FROM dead_letters WHERE sub = $1 AND replay = $2) AS dead"
            " FROM replays r WHERE r.sub = $1 AND r.name = $2",
            name,
            replay,
        )
        if row is None:
            return None
        total, pending, dead = row["total"], row["pending"], row["dead"]
        return Replay(
            replay,
            name,
            row["from_seq"],
            row["to_seq"],
            total,
            total - pending - dead,
            pending,
            dead,
            row["created_at"],
        )

    async def sequence_at(self, at_ms: int) -> int:
        """The first sequence appended at or after `at_ms` (one past the last if none)."""
        async with self._connection() as conn:
            seq = await conn.fetchval(
                "SELECT COALESCE((SELECT min(seq) FROM events WHERE appended_at >= $1),"
                " (SELECT COALESCE(max(seq), 0) + 1 FROM events))",
                at_ms,
            )
        return int(seq)
