"""The PostgreSQL `EventStore`, part 1: connections, transactions and lifecycle (the log is `log`).

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
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from router.fanout import Fanout, Handoffs
from router.notifier import Changes, Notifier
from router.persistence import SpecCache, Subscription, now_ms
from router.settings import Durability
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
acks, nacks and subscription changes wait for the flush in `fsync` mode; in `batched` mode they do not either
(`Connection.durability`): a commit is then safe against a crash of the router at once, and reaches the disk
when PostgreSQL's WAL writer flushes it, within 3 x wal_writer_delay (600 ms by default)."""
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
    durability: Durability = "fsync"
    """`fsync`: durable writes wait for the WAL's flush (synchronous_commit on); `batched`: they do not."""

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
            # `fsync` keeps the server's own setting (on by default, or stricter for a replicated server).
            **(BOOKKEEPING if self.durability == "batched" else {}),
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
    counted: set[str] = field(default_factory=set)
    """Subscriptions whose counters a statement of the transaction moved already (an append's, which queues its
    fan-out and counts it at once): none are added for them at commit unless `deltas` has more."""

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
        self._specs = SpecCache()
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
        await self._ensure_days(conn, {day_of(now_ms()), day_of(now_ms()) + 1})

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
        # One order for every writer: no deadlock between two.
        names = sorted(effects.touched - effects.deleted - (effects.counted - effects.deltas.keys()))
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
        subs = self._specs.subscriptions(
            (r["name"], r["spec"], r["secret"], r["created_at"], r["start_seq"]) for r in rows if r["name"] is not None
        )
        return int(rows[0]["version"]), subs

    # -- the log ----------------------------------------------------------------------------------


def shard() -> int:
    """The `counters` row a transaction adds to: picked at random, so concurrent writers rarely share one."""
    return random.randrange(SHARDS)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
