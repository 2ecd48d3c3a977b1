"""The events table's partitions: one per UTC day of `appended_at`, made before they are needed and dropped
whole once retention has passed them (router.stores.postgres.retention).

A partition is made as a table of its own and then attached: `ATTACH PARTITION` takes a lock on the
parent that lets reads and writes go on (SHARE UPDATE EXCLUSIVE), where `CREATE TABLE ... PARTITION OF`
would stop them. Replicas take turns through an advisory lock, so two never make the same day at once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from router.stores.postgres.schema import Conn

DAY_MS = 86_400_000
LOCK_KEY = 0x6361_7474_7562_6502  # "cattube" + 2: replicas take turns making partitions
PREFIX = "events_"


def day_of(at_ms: int) -> int:
    return at_ms // DAY_MS


def partition_name(day: int) -> str:
    return PREFIX + datetime.fromtimestamp(day * DAY_MS / 1000, UTC).strftime("%Y%m%d")


def is_missing_partition(exc: BaseException) -> bool:
    """An insert found no partition for its row (a day nobody has made yet)."""
    return isinstance(exc, asyncpg.CheckViolationError) and "no partition of relation" in str(exc)


async def ensure_partitions(conn: Conn, days: set[int]) -> list[str]:
    """Make the partitions of `days` that do not exist yet; returns the names made."""
    made: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        existing = await existing_partitions(conn)
        for day in sorted(days):
            name = partition_name(day)
            if name in existing:
                continue
            await conn.execute(f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
            await conn.execute(
                f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS})"
            )
            made.append(name)
    return made


async def existing_partitions(conn: Conn) -> dict[str, int]:
    """The attached partitions of `events`, by name, with the day each holds."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'events'::regclass"
    )
    days: dict[str, int] = {}
    for (name,) in rows:
        if name.startswith(PREFIX):
            stamp = datetime.strptime(name[len(PREFIX) :], "%Y%m%d").replace(tzinfo=UTC)
            days[name] = int(stamp.timestamp() * 1000) // DAY_MS
    return days
