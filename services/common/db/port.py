"""The port every service database implements: transactions of plain functions over a small connection.

    def title_of(conn: Connection, video_id: str) -> str | None:
        return conn.fetchval("SELECT title FROM videos WHERE video_id = ?", video_id)

    title = await db.transact(title_of, "v1")      # one transaction; `Unavailable` when the database is away

SQL handed to a `Connection` is the part both engines speak alike: `?` placeholders (the PostgreSQL
adapter numbers them), `INSERT ... ON CONFLICT`, `RETURNING`. What differs stays in the engine
modules (`sqlite.py`, `postgres.py`): types and tables (each part's `Migrations` holds one list of
steps per engine), counters (`next_value`), isolation and locking.

A transaction function may run more than once: on PostgreSQL a transaction that lost a race with
another replica (a serialization failure) is run again from the start. So it must act only through
the connection, and leave side effects (waking a relay, publishing a change) to its caller.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
PART_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


class Row(Protocol):
    """A result row: by column name or position (`sqlite3.Row` and asyncpg's `Record` both are)."""

    def __getitem__(self, key: int | str, /) -> Any: ...


class Connection(Protocol):
    """One transaction's connection, used from a plain (synchronous) function."""

    def fetch(self, sql: str, *params: Any) -> list[Row]: ...

    def fetchrow(self, sql: str, *params: Any) -> Row | None: ...

    def fetchval(self, sql: str, *params: Any) -> Any:
        """The first column of the first row, or None when there is no row."""
        ...

    def execute(self, sql: str, *params: Any) -> int:
        """Run a statement; returns how many rows it changed."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def next_value(self, sequence: str) -> int:
        """The next number of a counter that only grows, safe with any number of writers.

        On PostgreSQL the counter is a sequence the part's migrations create; SQLite keeps its counters in a table.
        """
        ...


Step = str | Callable[["Connection"], None]
"""A migration step: a SQL script, or a function of the connection for what SQL cannot say alone."""


@dataclass(frozen=True)
class Migrations:
    """The tables of one part (the catalog, the outbox), as numbered steps per engine, applied forward once.

    Step n (counting from 1) brings the part to version n on that engine; the version reached is
    kept per part in the database, so a step is never run twice, and a new one is appended, never
    edited in place. Each engine's list is its own history (a database is only ever one engine).
    """

    name: str
    sqlite: tuple[Step, ...]
    postgres: tuple[Step, ...]

    def __post_init__(self) -> None:
        if PART_NAME.fullmatch(self.name) is None:
            raise ValueError(f"part name {self.name!r}: expected a lowercase identifier")


class Database(Protocol):
    """A service's tables on one engine. `name` says what they hold, in messages."""

    name: str
    shared: bool
    """Other processes write the same tables (PostgreSQL): rows that belong to one process need an owner."""
    origin: str
    """A name for this process's connections, carried by the notifications its changes send."""

    @property
    def where(self) -> str:
        """Where the tables are, for messages (no password)."""
        ...

    async def open(self) -> None:
        """Create or migrate the tables; a database that is away does not fail this, its first use does."""
        ...

    async def transact(self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(conn, ...)` in one transaction; roll back if it raises. `Unavailable` if the database is away."""
        ...

    def notifications(self, channel: str) -> AsyncIterator[str | None]:
        """What is announced on `channel`; None once listening, and after each gap (some may have been missed)."""
        ...

    async def readiness(self) -> str | None: ...

    async def close(self) -> None: ...
