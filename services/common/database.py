"""One SQLite connection on one thread: a service's tables and its outbox, written in order, one transaction at a time.

    db = Database(path, SCHEMA, name="catalog", migrate=migrate)   # migrate: adds what an older file lacks
    await db.open()
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from services.common.errors import Unavailable

P = ParamSpec("P")
T = TypeVar("T")


class Database:
    """A SQLite file in WAL mode, written with synchronous=FULL; `name` says what it holds, in messages."""

    def __init__(
        self,
        path: Path,
        schema: str,
        *,
        name: str = "database",
        migrate: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = path
        self.schema = schema
        self.name = name
        # Brings a file made by an older version up to `schema` (which only creates what is missing).
        self.migrate = migrate
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

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
        conn.executescript(self.schema)
        if self.migrate is not None:
            self.migrate(conn)
        self._conn = conn

    async def transact(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
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
            result = fn(conn, *args, **kwargs)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def readiness(self) -> str | None:
        try:
            await self.transact(lambda conn: conn.execute("SELECT 1").fetchone())
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
