"""One SQLite connection on one thread: a service's tables and its outbox, written in order, one transaction at a time.

    db = SQLiteDatabase(path, [CATALOG, OUTBOX], name="catalog")
    await db.open()                                 # creates the file, runs the migrations not yet applied
    video = await db.transact(load_video, "v1")     # load_video(conn, "v1") runs on the database thread
    await db.close()

Why a thread of our own rather than aiosqlite: aiosqlite is exactly this (a thread per connection
and a queue), and not a dependency of the project. With a single writer there is no SQLITE_BUSY to
handle, and a change to the service's tables and the outbox row that announces it commit in one
transaction (a transactional outbox). Reads go through the same thread: they are short, and they
then always see every change committed before them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate

from services.common.db.port import Connection, Migrations, P, Row, T
from services.common.errors import Unavailable

# The engine's own tables: the version each part's tables reached, and the counters behind `next_value`.
ENGINE_TABLES = """
CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL, migrated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SQLiteConnection:
    """The port's `Connection` over `sqlite3` (its `?` placeholders are SQLite's own)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def fetch(self, sql: str, *params: Any) -> list[Row]:
        rows: list[Row] = self._conn.execute(sql, params).fetchall()
        return rows

    def fetchrow(self, sql: str, *params: Any) -> Row | None:
        row: Row | None = self._conn.execute(sql, params).fetchone()
        return row

    def fetchval(self, sql: str, *params: Any) -> Any:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def execute(self, sql: str, *params: Any) -> int:
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def next_value(self, sequence: str) -> int:
        value = self.fetchval(
            "INSERT INTO sequences (name, value) VALUES (?, 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
            sequence,
        )
        return int(value)


class SQLiteDatabase:
    """A SQLite file in WAL mode, written with synchronous=FULL; `name` says what it holds, in messages."""

    shared = False  # one process owns the file
    origin = "sqlite"

    def __init__(self, path: Path, migrations: Sequence[Migrations], *, name: str = "database") -> None:
        self.path = path
        self.migrations = tuple(migrations)
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{self.name}")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is promised to someone (a 202, an ack to the router); it must survive a power cut too.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(ENGINE_TABLES)
        for part in self.migrations:
            _migrate(conn, part, self.path)
        self._conn = conn

    async def transact(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(conn, ...)` in one transaction on the database thread; roll back if it raises."""
        if self._executor is None:
            raise Unavailable(f"the {self.name} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, args, kwargs)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        conn = self._conn
        if conn is None:
            raise Unavailable(f"the {self.name} is closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(SQLiteConnection(conn), *args, **kwargs)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def notifications(self, channel: str) -> AsyncIterator[str | None]:
        """None ever: this process is the file's only writer, so there is nobody else to hear."""
        return
        yield  # an async generator that ends at once

    async def readiness(self) -> str | None:
        try:
            await self.transact(lambda conn: conn.fetchval("SELECT 1"))
        except (sqlite3.Error, Unavailable) as exc:
            return f"the {self.name} at {self.path} cannot be read ({exc})"
        return None

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        executor.shutdown(wait=False)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _migrate(conn: sqlite3.Connection, part: Migrations, path: Path) -> None:
    """Apply the steps of `part` not applied yet, each in a transaction of its own with its new version."""
    row = conn.execute("SELECT version FROM schema_versions WHERE name = ?", (part.name,)).fetchone()
    current = 0 if row is None else int(row[0])
    if current > len(part.sqlite):
        raise Unavailable(
            f"{path} holds {part.name} tables at version {current}, newer than this CatTube knows "
            f"({len(part.sqlite)}): run the newer version, or restore a backup"
        )
    for version, step in enumerate(part.sqlite[current:], start=current + 1):
        # executescript takes no parameters: the version and the time are numbers we made, the name an identifier.
        record = (
            "INSERT INTO schema_versions (name, version, migrated_at) "
            f"VALUES ('{part.name}', {version}, {time.time()}) "
            "ON CONFLICT (name) DO UPDATE SET version = excluded.version, migrated_at = excluded.migrated_at;"
        )
        try:
            if isinstance(step, str):
                conn.executescript(f"BEGIN IMMEDIATE;\n{step}\n;{record}\nCOMMIT;")
            else:
                conn.execute("BEGIN IMMEDIATE")  # not executescript from here: it would commit first
                step(SQLiteConnection(conn))
                conn.execute(record)
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
