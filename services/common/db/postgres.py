"""PostgreSQL behind the port: a schema of the service's own, asyncpg underneath, plain functions on top.

    db = PostgresDatabase("postgresql://user:pw@host/db", "store", [CATALOG, OUTBOX], name="catalog")
    await db.open()                                 # the schema and its tables, under an advisory lock
    video = await db.transact(load_video, "v1")

Transaction functions are the plain functions the SQLite engine runs on its thread. Here too they
run on a worker thread, and each statement is handed to asyncpg on the event loop and awaited
there: one set of rules (the catalog, the outboxes) runs on both engines unchanged. Transactions
are REPEATABLE READ, so two replicas changing one row at once cannot both win: the loser gets a
serialization failure and its function runs again from the start, on fresh data.

The schema is created, and migrated, under an advisory lock: replicas that start at once take
turns, and each finds what the first one made. A server that is away (down, restarting,
unreachable) makes `transact` raise `Unavailable` (a 503) and `readiness` say so. The pool opens
connections on demand, so a service starts without its server and recovers by itself once it is
back; the first transaction then creates the schema if that had not happened yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from router.client import full_jitter
from services.common.db.port import Connection, Migrations, P, Row, T
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

R = TypeVar("R")

POOL_SIZE = 10
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 3.0
CLOSE_TIMEOUT_S = 10.0
SERIALIZATION_RETRIES = 10
# LISTEN needs no traffic, so a link cut without a word (no FIN) only shows when we ask something.
LISTEN_HEARTBEAT_S = 10.0
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# What "the database is away" looks like, as opposed to a mistake in our SQL (which stays a 500).
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # the connection failed or was lost mid-operation
    asyncpg.InterfaceError,  # "connection is closed", a pool being closed
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, too many connections
)

ENGINE_TABLES = """
CREATE TABLE IF NOT EXISTS schema_versions (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    migrated_at DOUBLE PRECISION NOT NULL
);
"""


class PostgresDatabase:
    """The tables of one service in `schema` of the database at `url`."""

    shared = True  # replicas, and instances of other services, use the same database

    def __init__(
        self,
        url: str,
        schema: str,
        migrations: Sequence[Migrations],
        *,
        name: str = "database",
        pool_size: int = POOL_SIZE,
    ) -> None:
        if SCHEMA_NAME.fullmatch(schema) is None:
            raise ValueError(f"schema {schema!r}: expected a lowercase identifier")
        self.url = url
        self.schema = schema
        self.migrations = tuple(migrations)
        self.name = name
        self.pool_size = pool_size
        # Set on every connection of ours: a trigger's notification names it, so we can tell our changes from others'.
        self.origin = f"cattube-{schema}-{secrets.token_hex(6)}"
        self._pool: asyncpg.Pool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._migrated = False
        self._migrating = asyncio.Lock()
        self._running: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def where(self) -> str:
        return f"{redacted(self.url)} (schema {self.schema})"

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.pool_size, thread_name_prefix=f"pg-{self.schema}")
        # min_size=0: no connection is made here, so a server that is down does not stop the service starting.
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=0,
            max_size=self.pool_size,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=COMMAND_TIMEOUT_S,
            server_settings={"search_path": self.schema, "application_name": self.origin},
        )
        try:
            await self._ensure_migrated()
        except Unavailable as exc:
            log.warning("%s; answering 503 until it is back", exc.detail)

    async def transact(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(conn, ...)` in one transaction on a worker thread; run it again if it lost a race."""
        if self._pool is None or self._closed:
            raise Unavailable(f"the {self.name} is not open")

        def call(conn: Connection) -> T:
            return fn(conn, *args, **kwargs)

        task = asyncio.ensure_future(self._transact(call))
        self._running.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self._running.discard)
        # Shielded: a caller that goes away (a client hung up) must not release the connection while its
        # function still runs on a thread. The transaction finishes on its own, as it would on SQLite.
        return await asyncio.shield(task)

    async def _transact(self, call: Callable[[Connection], T]) -> T:
        await self._ensure_migrated()
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        for attempt in itertools.count(1):
            began = False
            try:
                async with self._pool.acquire() as raw:
                    async with raw.transaction(isolation="repeatable_read"):
                        began = True
                        return await loop.run_in_executor(self._executor, call, BridgedConnection(raw, loop))
            except asyncpg.exceptions.TransactionRollbackError as exc:  # a serialization failure or a deadlock
                if attempt >= SERIALIZATION_RETRIES:
                    raise Unavailable(f"the {self.name} is too busy: {attempt} tries lost a race ({exc})") from exc
                log.debug("%s: transaction lost a race (%s); running it again", self.name, exc)
            except UNREACHABLE as exc:
                if not began and attempt == 1:
                    continue  # a pooled connection the server had closed before we asked: one fresh try
                raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def _ensure_migrated(self) -> None:
        if self._migrated:
            return
        assert self._pool is not None
        async with self._migrating:
            if self._migrated:
                return
            try:
                async with self._pool.acquire() as raw, raw.transaction():
                    # Read committed: once the lock is ours, each statement sees what a replica before us made.
                    await raw.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"cattube:{self.schema}")
                    await raw.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                    await raw.execute(f'SET LOCAL search_path TO "{self.schema}"')
                    await raw.execute(ENGINE_TABLES)
                    for part in self.migrations:
                        await self._migrate(raw, part)
            except UNREACHABLE as exc:
                raise self._unavailable(exc) from exc
            self._migrated = True

    async def _migrate(self, raw: PoolConnectionProxy[Any], part: Migrations) -> None:
        current = await raw.fetchval("SELECT version FROM schema_versions WHERE name = $1", part.name) or 0
        if current > len(part.postgres):
            raise Unavailable(
                f"{self.where} holds {part.name} tables at version {current}, newer than this CatTube knows "
                f"({len(part.postgres)}): run the newer version"
            )
        for version, step in enumerate(part.postgres[current:], start=current + 1):
            if isinstance(step, str):
                await raw.execute(step)
            else:  # a plain function, like a transaction's: on a worker thread, its statements back on the loop
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, step, BridgedConnection(raw, loop))
            await raw.execute(
                "INSERT INTO schema_versions (name, version, migrated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET version = excluded.version, migrated_at = excluded.migrated_at",
                part.name,
                version,
                time.time(),
            )
            log.info("%s: %s tables migrated to version %d", self.where, part.name, version)

    async def notifications(self, channel: str) -> AsyncIterator[str | None]:
        """Payloads sent to `channel` (NOTIFY) by anyone, this process too, on one listening connection.

        None comes first, once listening, and again each time the connection, lost, is made again (with
        backoff): what was sent while nobody listened is gone.
        """
        failures = 0
        while True:
            inbox: asyncio.Queue[str | None] = asyncio.Queue()  # None: the connection ended
            heard, ended = _posting_to(inbox)
            try:
                conn = await asyncpg.connect(
                    self.url, timeout=CONNECT_TIMEOUT_S, server_settings={"application_name": f"{self.origin}-listen"}
                )
                await conn.add_listener(channel, heard)
            except UNREACHABLE as exc:
                failures += 1
                delay = full_jitter(failures, 0.5, 30.0)
                log.warning("cannot listen on %s at %s (%s); trying again in %.1f s", channel, self.where, exc, delay)
                await asyncio.sleep(delay)
                continue
            try:
                conn.add_termination_listener(ended)
                if failures:
                    log.info("listening on %s at %s again", channel, self.where)
                failures = 0
                yield None
                while (payload := await _next(inbox, conn)) is not None:
                    yield payload
                log.warning("lost the connection listening on %s at %s", channel, self.where)
                failures = 1
            finally:
                conn.terminate()

    async def readiness(self) -> str | None:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self.transact(lambda conn: conn.fetchval("SELECT 1"))
        except TimeoutError:
            return f"the {self.name} database at {self.where} does not answer within {READY_TIMEOUT_S:g} s"
        except Unavailable as exc:
            return exc.detail
        return None

    async def close(self) -> None:
        self._closed = True
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(*self._running, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await pool.close()
            except TimeoutError:
                pool.terminate()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _unavailable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"the {self.name} database at {self.where} cannot be reached ({type(exc).__name__}: {exc})")


class BridgedConnection:
    """The port's `Connection` for a function on a worker thread: each statement runs on the event loop."""

    def __init__(self, raw: PoolConnectionProxy[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._raw = raw
        self._loop = loop

    def _wait(self, call: Coroutine[Any, Any, R]) -> R:
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()

    def fetch(self, sql: str, *params: Any) -> list[Row]:
        return list(self._wait(self._raw.fetch(numbered(sql), *params)))

    def fetchrow(self, sql: str, *params: Any) -> Row | None:
        row: Row | None = self._wait(self._raw.fetchrow(numbered(sql), *params))
        return row

    def fetchval(self, sql: str, *params: Any) -> Any:
        return self._wait(self._raw.fetchval(numbered(sql), *params))

    def execute(self, sql: str, *params: Any) -> int:
        status = self._wait(self._raw.execute(numbered(sql), *params))
        count = status.rsplit(" ", 1)[-1]  # "INSERT 0 1", "UPDATE 3", "DELETE 0"
        return int(count) if count.isdigit() else 0

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._wait(self._raw.executemany(numbered(sql), [tuple(row) for row in rows]))

    def next_value(self, sequence: str) -> int:
        return int(self._wait(self._raw.fetchval("SELECT nextval($1::regclass)", sequence)))


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...`, leaving quoted literals alone."""
    pieces = sql.split("'")
    counter = itertools.count(1)
    for i in range(0, len(pieces), 2):  # even pieces are outside quotes ('' inside a literal splits evenly)
        pieces[i] = re.sub(r"\?", lambda _: f"${next(counter)}", pieces[i])
    return "'".join(pieces)


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _posting_to(inbox: asyncio.Queue[str | None]) -> tuple[Callable[..., None], Callable[..., None]]:
    """asyncpg's callbacks for a listening connection: a payload heard, the connection ended."""

    def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        inbox.put_nowait(payload)

    def ended(_conn: object) -> None:
        inbox.put_nowait(None)

    return heard, ended


async def _next(inbox: asyncio.Queue[str | None], conn: asyncpg.Connection) -> str | None:
    """The next payload; None once the connection has ended, or does not answer when asked during a lull."""
    while True:
        try:
            async with asyncio.timeout(LISTEN_HEARTBEAT_S):
                return await inbox.get()
        except TimeoutError:
            pass
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await conn.execute("SELECT 1")
        except UNREACHABLE:
            return None


def _settled(task: asyncio.Task[Any]) -> None:
    # A transaction whose caller went away still ends with a result or an error nobody awaits: read it here,
    # so asyncio does not log it as never retrieved (the caller's own error was raised to the caller).
    if not task.cancelled():
        task.exception()
