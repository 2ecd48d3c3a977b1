"""The PostgreSQL `EventStore`, part 1: connections, transactions, lifecycle and the log.

Any number of routers share one database, so every call is a transaction of its own on a pooled
connection (asyncpg), and the hot ones (claims, acks, push outcomes) are one statement each, committed
on their own without a BEGIN/COMMIT round trip. Counters a call moves (router.stores.postgres.schema,
`counters`) are added to a row picked at random among a few per subscription, in the same transaction.
After each commit the call's changes go to the notifier, which tells this replica's waiters at once and
the other replicas through LISTEN/NOTIFY (router.stores.postgres.notifier).

The database may be away when the router starts or go away while it runs: the store then answers
`Unavailable` (503) and says why in `readiness`, keeps trying to connect in the background, and
carries on by itself once it can (nothing is lost: every answered call had committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from router.cloudevents import Encoded
from router.fanout import Catalog, Fanout, Handoffs
from router.notifier import Changes, Notifier
from router.persistence import Appended, Message, Subscription, spec_from_json
from router.receipts import new_nonce, receipt_for
from router.stores.postgres.partitions import day_of, ensure_partitions, is_missing_partition
from router.stores.postgres.schema import SCHEMA, SHARDS, migrate
from services.common.errors import Unavailable

if TYPE_CHECKING:
    from router.stores.postgres.schema import Conn

T = TypeVar("T")

log = logging.getLogger(__name__)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
"""What means the database cannot be reached (or is restarting) rather than that a statement was wrong."""

BEGIN = "BEGIN; SELECT pg_current_xact_id()"
"""How a transaction starts: its id taken at once, before its first read (appends rely on it)."""
BOOKKEEPING = {"synchronous_commit": "off"}
"""The sessions that record delivery state (leases, push outcomes, releases) commit without waiting for the WAL to
reach the disk: losing the last few of those in a crash of the database server only means a delivery goes out
again, which at-least-once allows (the SQLite store commits the same ones without an fsync). Published events,
acks, nacks and subscription changes wait for the flush."""
LEASE_LIMIT = 2**31 - 1
"""Stands for "no max_receive_count" in claims (push leases have none)."""


@dataclass(frozen=True, slots=True)
class Connection:
    """How the store reaches PostgreSQL: the URL and the limits put on each of its sessions."""

    url: str
    pool_size: int = 10
    statement_timeout_s: float = 30.0
    idle_in_transaction_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0

    def where(self) -> str:
        """The host, port and database, for messages (never the password)."""
        parts = urlsplit(self.url)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"

    def server_settings(self) -> dict[str, str]:
        return {
            "search_path": SCHEMA,
            "application_name": "cattube-router",
            # A stuck statement or a client that left a transaction open must not hold rows (and the vacuum
            # horizon) for long: claims slow down within seconds behind a held snapshot (issue 11's research).
            "statement_timeout": str(int(self.statement_timeout_s * 1000)),
            "idle_in_transaction_session_timeout": str(int(self.idle_in_transaction_timeout_s * 1000)),
            "jit": "off",  # the router's statements are small; JIT compilation would only add latency
        }


@dataclass
class Effects:
    """What one call did, for the counters it moves (added at commit) and the notifier (told after it)."""

    touched: set[str] = field(default_factory=set)
    ready: set[str] = field(default_factory=set)
    hidden_until: dict[str, int] = field(default_factory=dict)
    catalog: bool = False
    handoffs: Handoffs = field(default_factory=dict)
    deltas: dict[str, list[int]] = field(default_factory=dict)
    """Per subscription: messages, dead letters, delivered, failed (added to `counters` at commit)."""
    deleted: set[str] = field(default_factory=set)
    """Subscriptions deleted: waiters hear of it, and no counters are added for them."""

    def count(self, sub: str, *, messages: int = 0, dead: int = 0, delivered: int = 0, failed: int = 0) -> None:
        self.touched.add(sub)
        delta = self.deltas.setdefault(sub, [0, 0, 0, 0])
        delta[0] += messages
        delta[1] += dead
        delta[2] += delivered
        delta[3] += failed

    def hide(self, sub: str, until_ms: int) -> None:
        self.touched.add(sub)
        self.hidden_until[sub] = min(until_ms, self.hidden_until.get(sub, until_ms))

    def changes(self) -> Changes:
        return Changes(frozenset(self.touched), frozenset(self.ready), dict(self.hidden_until), self.catalog)


@dataclass
class Tx:
    """A transaction under way: its connection and what it did so far."""

    conn: Conn
    effects: Effects = field(default_factory=Effects)


async def _roll_back(conn: Conn) -> None:
    """End a failed transaction here (the pool would, but complains of it); a connection that cannot is closed, and
    the pool replaces it."""
    if conn.is_closed() or not conn.is_in_transaction():
        return
    try:
        await conn.execute("ROLLBACK")
    except Exception:
        conn.terminate()


async def _reset(conn: Conn) -> None:
    """Before a connection goes back to the pool: roll back what a failed call left open, and nothing else (the
    default reset costs a round trip per call, for session state the store never sets)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class PostgresCore:
    def __init__(self, connection: Connection | str, *, replica_id: str | None = None) -> None:
        self.connection = Connection(connection) if isinstance(connection, str) else connection
        self.replica_id = replica_id or uuid.uuid4().hex[:16]
        self.write_failure: str | None = None
        self.unavailable: str | None = f"the router's database at {self.connection.where()} has not answered yet"
        """Why the database cannot be used now (None when the last call reached it)."""
        self._pool: asyncpg.Pool | None = None
        self._bookkeeping: asyncpg.Pool | None = None
        """Sessions for delivery bookkeeping (see BOOKKEEPING)."""
        self._notifier: Notifier | None = None
        self._fanout = Fanout()
        self.connected = asyncio.Event()
        """Set once the database answered and the schema is in place (later failures are `unavailable`)."""
        self._answered = asyncio.Event()
        self._closing = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None
        self._days: set[int] = set()
        """Days whose partition this replica knows to exist."""
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self, notifier: Notifier, fanout: Fanout, *, first_answer_s: float = 5.0) -> None:
        """Start connecting (schema, partitions) and wait up to `first_answer_s` for the first verdict. A database
        that is away does not fail the start: the store answers `Unavailable` and keeps trying meanwhile."""
        self._notifier, self._fanout = notifier, fanout
        notifier.listen(self._heard)
        c = self.connection
        self._pool, self._bookkeeping = [
            await asyncpg.create_pool(
                c.url,
                min_size=0,
                max_size=c.pool_size,
                timeout=c.connect_timeout_s,
                command_timeout=c.statement_timeout_s + 5,
                server_settings={**c.server_settings(), **extra},
                reset=_reset,
                max_inactive_connection_lifetime=60,
            )
            for extra in ({}, BOOKKEEPING)
        ]
        self._connector = asyncio.create_task(self._connect(), name="router-database-connect")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_answer_s):
                await self._answered.wait()

    async def _connect(self, backoff_initial_s: float = 0.25, backoff_max_s: float = 10.0) -> None:
        """Set up the schema and today's partitions, retrying with backoff until the database answers."""
        failures = 0
        while not self._closing.is_set():
            try:
                assert self._pool is not None
                async with self._pool.acquire() as conn:
                    await migrate(conn)
                    await self._prepare(conn)
            except Exception as exc:  # away, or refusing us (a wrong password, no such database): say so, retry
                failures += 1
                ceiling = min(backoff_max_s, backoff_initial_s * 2 ** (failures - 1))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # equal jitter: replicas do not retry in step
                self.unavailable = (
                    f"the router's database at {self.connection.where()} cannot be reached ({_reason(exc)});"
                    f" trying again in the background (attempt {failures}, next in {delay:.1f} s)"
                )
                log.error("%s", self.unavailable)
                self._answered.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
                continue
            self.unavailable = None
            self.connected.set()
            if failures:
                log.info("the router's database answers now, after %d failed attempt(s)", failures)
                if self._answered.is_set() and self._notifier is not None:
                    self._notifier.publish(Changes(catalog=True, everything=True))  # the bus loads what it could not
            self._answered.set()
            return

    async def _prepare(self, conn: Conn) -> None:
        """After the schema: what the store needs before its first call (the other parts add to it)."""
        await self._ensure_days(conn, {day_of(_wall_ms()), day_of(_wall_ms()) + 1})

    async def _ensure_days(self, conn: Conn, days: set[int]) -> None:
        made = await ensure_partitions(conn, days - self._days)
        if made:
            log.info("events partitions made: %s", ", ".join(made))
        self._days |= days

    async def close(self) -> None:
        self._closing.set()
        if self._notifier is not None:
            self._notifier.unlisten(self._heard)
        for task in [self._connector, *self._background]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *[t for t in [self._connector, *self._background] if t is not None], return_exceptions=True
        )
        for pool in (self._pool, self._bookkeeping):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 10)
                except TimeoutError:
                    pool.terminate()
        self._pool = self._bookkeeping = None

    async def readiness(self) -> str | None:
        """None when the database answers; after a failed call, it is asked again here (a `SELECT 1`)."""
        if not self.connected.is_set() or self.unavailable is None:
            return self.unavailable
        with contextlib.suppress(Unavailable):
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1")
        return self.unavailable

    def _heard(self, changes: Changes) -> None:
        """Changes from this replica or another: the subscriptions part follows up on catch-ups here."""

    # -- plumbing ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self, *, bookkeeping: bool = False) -> AsyncIterator[Conn]:
        """A pooled connection (from the bookkeeping sessions, see BOOKKEEPING, when asked); the database being away
        becomes `Unavailable` naming it."""
        pool = self._bookkeeping if bookkeeping else self._pool
        if not self.connected.is_set() or pool is None:
            raise Unavailable(self.unavailable or "the router's database is not open")
        try:
            async with pool.acquire() as conn:
                yield conn
        except CONNECTION_ERRORS as exc:
            self.unavailable = f"the router's database at {self.connection.where()} cannot be reached ({_reason(exc)})"
            log.warning("%s", self.unavailable)
            raise Unavailable(self.unavailable) from exc
        except asyncpg.QueryCanceledError as exc:
            raise Unavailable(f"the router's database did not answer in time ({exc})") from exc
        except asyncpg.DiskFullError as exc:
            self.write_failure = f"the database's disk is full ({exc})"
            log.error("the bus could not commit: %s", self.write_failure)
            raise
        self.unavailable = None

    @asynccontextmanager
    async def _transaction(self, begin: str = BEGIN, *, bookkeeping: bool = False) -> AsyncIterator[Tx]:
        """One transaction. Its transaction id is taken first, before anything is read: appends rely on it
        (router.stores.postgres.subscriptions explains why). The counters it moved are added before COMMIT;
        its changes are published and its hand-offs handed over after."""
        async with self._connection(bookkeeping=bookkeeping) as conn:
            tx = Tx(conn)
            await conn.execute(begin)
            try:
                yield tx
                await self._add_counters(conn, tx.effects)
                await conn.execute("COMMIT")
            except BaseException:
                self._fanout.rolled_back(tx.effects.handoffs)  # the leases handed off went with the transaction
                await _roll_back(conn)
                raise
        self.write_failure = None
        self._published(tx.effects)

    async def _write(
        self, now_ms: int, fn: Callable[..., Awaitable[T]], *args: Any, begin: str = BEGIN, bookkeeping: bool = False
    ) -> T:
        """Run `fn(tx, *args)` in a transaction; once more after making a missing day's partition."""
        try:
            async with self._transaction(begin, bookkeeping=bookkeeping) as tx:
                return await fn(tx, *args)
        except asyncpg.CheckViolationError as exc:
            if not is_missing_partition(exc):
                raise
        self._days.discard(day_of(now_ms))  # dropped by retention (on another replica, maybe) since we knew it
        async with self._connection() as conn:
            await self._ensure_days(conn, {day_of(now_ms)})
        async with self._transaction(begin, bookkeeping=bookkeeping) as tx:
            return await fn(tx, *args)

    async def _add_counters(self, conn: Conn, effects: Effects) -> None:
        names = sorted(effects.touched - effects.deleted)  # one order for every writer: no deadlock between two
        if not names:
            return
        deltas = [effects.deltas.get(name, [0, 0, 0, 0]) for name in names]
        await conn.execute(
            "INSERT INTO counters AS c (sub, shard, messages, dead, delivered, failed, changes)"
            " SELECT sub, $2, m, d, dl, f, 1 FROM unnest($1::text[], $3::bigint[], $4::bigint[], $5::bigint[],"
            " $6::bigint[]) AS t(sub, m, d, dl, f)"
            " ON CONFLICT (sub, shard) DO UPDATE SET messages = c.messages + EXCLUDED.messages,"
            " dead = c.dead + EXCLUDED.dead, delivered = c.delivered + EXCLUDED.delivered,"
            " failed = c.failed + EXCLUDED.failed, changes = c.changes + 1",
            names,
            shard(),
            [d[0] for d in deltas],
            [d[1] for d in deltas],
            [d[2] for d in deltas],
            [d[3] for d in deltas],
        )

    def _published(self, effects: Effects) -> None:
        """After a commit: tell the waiters, and hand the leased messages to their dispatchers."""
        self.write_failure = None
        changes = effects.changes()
        if changes and self._notifier is not None:
            self._notifier.publish(changes)
        self._fanout.hand_off(effects.handoffs)

    def _in_background(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the subscriptions as of a transaction -----------------------------------------------------

    async def _read_subscriptions(self, conn: Conn) -> tuple[int, list[Subscription]]:
        """The catalog version and the subscriptions, from one snapshot."""
        rows = await conn.fetch(
            "SELECT c.version, s.name, s.spec, s.secret, s.created_at, s.start_seq"
            " FROM catalog c LEFT JOIN subscriptions s ON true ORDER BY s.name"
        )
        subs = [
            Subscription(spec_from_json(r["name"], r["spec"]), r["secret"], r["created_at"], r["start_seq"])
            for r in rows
            if r["name"] is not None
        ]
        return int(rows[0]["version"]), subs

    # -- the log ----------------------------------------------------------------------------------

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
        lease_of: dict[str, int] = {}
        bodies: dict[int, bytes] = {}
        effects = tx.effects
        nonce = new_nonce()
        for (event, body), seq in fresh:
            for sub, lease_ms in self._fanout.targets(catalog, event):
                name = sub.spec.name
                subs.append(name)
                seqs.append(seq)
                keys.append(_key(event))
                leased = lease_ms is not None
                # An idle dispatcher granted a slot: the message is leased in this very transaction and handed
                # to it after the commit (router.fanout). Counted in `handoffs` now, so a rollback frees the slot.
                visible.append(now_ms + lease_ms if lease_ms is not None else now_ms)
                attempts.append(1 if leased else 0)
                nonces.append(nonce if leased else None)
                holders.append(self.replica_id if leased else None)
                if lease_ms is not None:
                    lease_of[name] = lease_ms
                    effects.handoffs.setdefault(name, []).append(Message("", 1, seq, body, now_ms))
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
            if row["leased"]:
                effects.handoffs[name] = [
                    Message(receipt_for(msg_id, nonce), 1, seq, bodies[seq], now_ms)
                    for msg_id, seq in zip(row["leased"], row["leased_seqs"], strict=True)
                ]
                effects.hide(name, now_ms + lease_of[name])
        # Slots granted for a subscription deleted meanwhile (nothing was queued for it) are free again.
        self._fanout.rolled_back({name: msgs[len(effects.handoffs.get(name, ())) :] for name, msgs in granted.items()})


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


def shard() -> int:
    """The `counters` row a transaction adds to: picked at random, so concurrent writers rarely share one."""
    return random.randrange(SHARDS)


def _key(event: dict[str, Any]) -> str | None:
    key = event.get("partitionkey")
    return None if key is None else str(key)


def _subscriptions_from_json(text: str | None) -> list[Subscription]:
    return [
        Subscription(spec_from_json(name, spec), secret, created_at, start_seq)
        for name, spec, secret, created_at, start_seq in json.loads(text or "null") or []
    ]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _wall_ms() -> int:
    return int(time.time() * 1000)
