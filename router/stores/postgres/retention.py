"""The PostgreSQL `EventStore`, part 4: retention, by dropping whole days of the events table.

A day's partition is past retention once its last millisecond is. If no message and no dead letter
still refers to one of its events, it is dropped: a catalog change rather than a DELETE of every row,
so nothing is left for vacuum. The drop needs the events table to itself for a moment, so it waits at
most `DROP_LOCK_TIMEOUT` for it (queries queue behind a waiting lock) and is tried again at the next
purge if it did not get it. A day that something still refers to is thinned instead: its unreferenced
events are deleted in chunks, and the rest wait for their messages to be acked or purged, after which
the day is dropped like any other. Retention is therefore by the day: an event is kept until the end
of its day plus the retention window.

The keys that detect repeated publishes (`event_ids`) of a dropped day are deleted after it, in chunks
(until then a repeat of one of those events is still answered as a duplicate, which it is).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import asyncpg

from router.stores.postgres.partitions import DAY_MS, day_of, existing_partitions
from router.stores.postgres.subscriptions import PostgresSubscriptions

if TYPE_CHECKING:
    from router.stores.postgres.schema import Conn

log = logging.getLogger(__name__)

PURGE_CHUNK = 5_000
DROP_LOCK_TIMEOUT = "1s"


class PostgresRetention(PostgresSubscriptions):
    async def purge_expired(self, before_ms: int) -> int:
        """Drop (or thin) the days entirely before `before_ms`; returns how many events went. Also makes the
        partitions of today and tomorrow, so appends never wait for one."""
        async with self._connection() as conn:
            await self._ensure_days(conn, {day_of(before_ms), day_of(_today_ms()), day_of(_today_ms()) + 1})
            days = await existing_partitions(conn)
        total = 0
        for name, day in sorted(days.items(), key=lambda item: item[1]):
            if (day + 1) * DAY_MS <= before_ms:
                total += await self._retire(name, day)
        return total

    async def _retire(self, name: str, day: int) -> int:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"SELECT count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM {name}")
            assert row is not None
            if not await _referenced(conn, row["lo"], row["hi"]):
                if await self._drop(conn, name):
                    self._days.discard(day)
                    log.info("retention: dropped %s (%d events)", name, row["n"])
                    await self._forget_keys(day)
                    return int(row["n"])
                return 0
        return await self._thin(name)

    async def _drop(self, conn: Conn, name: str) -> bool:
        """Drop the partition if nothing refers to its events, with the events table locked meanwhile (a message
        queued between the check and the drop would lose its event)."""
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
                await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                bounds = await conn.fetchrow(f"SELECT min(seq) AS lo, max(seq) AS hi FROM {name}")
                assert bounds is not None
                if await _referenced(conn, bounds["lo"], bounds["hi"]):
                    return False
                await conn.execute(f"DROP TABLE {name}")
        except asyncpg.LockNotAvailableError:
            log.warning(
                "retention: %s not dropped (the events table was busy for %s); next purge tries again",
                name,
                DROP_LOCK_TIMEOUT,
            )
            return False
        return True

    async def _thin(self, name: str) -> int:
        """Delete the day's events nothing refers to (and their keys), a chunk per transaction."""
        total = 0
        while True:
            async with self._connection() as conn:
                count: int = await conn.fetchval(
                    f"WITH doomed AS (SELECT e.seq FROM {name} e"
                    " WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.seq = e.seq)"
                    " AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.seq = e.seq) LIMIT $1 FOR UPDATE),"
                    f" gone AS (DELETE FROM {name} e USING doomed d WHERE e.seq = d.seq RETURNING e.source, e.id),"
                    " keys AS (DELETE FROM event_ids k USING gone g WHERE k.source = g.source AND k.id = g.id)"
                    " SELECT count(*) FROM gone",
                    PURGE_CHUNK,
                )
            total += count
            if count < PURGE_CHUNK:
                return total

    async def _forget_keys(self, day: int) -> None:
        while True:
            async with self._connection() as conn:
                count: int = await conn.fetchval(
                    "WITH gone AS (DELETE FROM event_ids WHERE ctid = ANY(ARRAY("
                    " SELECT ctid FROM event_ids WHERE appended_at >= $1 AND appended_at < $2 LIMIT $3))"
                    " RETURNING 1) SELECT count(*) FROM gone",
                    day * DAY_MS,
                    (day + 1) * DAY_MS,
                    PURGE_CHUNK,
                )
            if count < PURGE_CHUNK:
                return


async def _referenced(conn: Conn, lo: int | None, hi: int | None) -> bool:
    """Does a message or a dead letter refer to a sequence in [lo, hi] (the partition's range, or more)?"""
    if lo is None or hi is None:
        return False
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE seq BETWEEN $1 AND $2)"
            " OR EXISTS (SELECT 1 FROM dead_letters WHERE seq BETWEEN $1 AND $2)",
            lo,
            hi,
        )
    )


def _today_ms() -> int:
    return int(time.time() * 1000)
