"""Unfinished resumable uploads on local disk: a data file each, and a row that says how much of it counts.

    partials = Partials(settings.partials_dir, expiry_s=86400)
    await partials.open()
    partial = await partials.create(length=52_428_800, metadata=raw_header, described=...)
    with partials.writer(partial.upload_id, partial.offset) as file:   # the data file, cut back to the offset
        await file.write(piece); ...
        await file.sync()                                               # on disk first...
    await partials.commit(partial.upload_id, new_offset)               # ...then counted

The row's `offset` is the promise made to clients (`HEAD` answers it): it only ever counts bytes that
were fsynced to the data file first, and it is committed with synchronous=FULL. The data file may
hold more than that (bytes written after the last commit when the service was killed, or a PATCH
whose checksum failed); those are cut off before the next write. So after a `kill -9`, or a power
cut, `HEAD` reports an offset whose bytes are all there, and the client sends the rest.

A finished upload keeps its row (`complete`, no data file) until it expires, so that a client that
missed the last answer still learns with `HEAD` that nothing is left to send. Everything expires
`expiry_s` after its last write; `sweep` removes what has, and data files no row accounts for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.db import Connection, Migrations, Row, SQLiteDatabase

__all__ = ["Partial", "PartialFile", "Partials"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS partials (
    upload_id   TEXT PRIMARY KEY,            -- also the video id once the upload is accepted
    length      INTEGER NOT NULL,
    "offset"    INTEGER NOT NULL DEFAULT 0,  -- bytes fsynced to the data file and promised to the client
    metadata    TEXT NOT NULL,               -- Upload-Metadata as the client sent it (HEAD echoes it)
    title       TEXT,
    renditions  TEXT,
    filename    TEXT,
    complete    INTEGER NOT NULL DEFAULT 0,  -- 1 once the upload was accepted (its data file is gone)
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS partials_by_expiry ON partials (expires_at);
"""
# Always a SQLite file beside the data files it accounts for: they are on this machine's disk, not shared.
PARTIALS = Migrations("partials", sqlite=(SCHEMA,), postgres=())
DATA_SUFFIX = ".part"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Partial:
    upload_id: str
    length: int
    offset: int
    metadata: str
    title: str | None
    renditions: str | None
    filename: str | None
    complete: bool
    expires_at: float


class Partials:
    def __init__(self, directory: Path, *, expiry_s: float, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.expiry_s = expiry_s
        self.clock = clock  # wall time: expiry outlives restarts
        self.db = SQLiteDatabase(directory / "partials.db", [PARTIALS], name="resumable uploads database")

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    def data_path(self, upload_id: str) -> Path:
        if not _UPLOAD_ID.fullmatch(upload_id):  # ids are ours, but a path is never built from anything else
            raise ValueError(f"not an upload id: {upload_id!r}")
        return self.directory / f"{upload_id}{DATA_SUFFIX}"

    async def create(
        self, length: int, metadata: str, *, title: str | None, renditions: str | None, filename: str | None
    ) -> Partial:
        partial = Partial(
            upload_id=uuid.uuid4().hex,
            length=length,
            offset=0,
            metadata=metadata,
            title=title,
            renditions=renditions,
            filename=filename,
            complete=False,
            expires_at=self.clock() + self.expiry_s,
        )
        await self.db.transact(_insert, partial, self.clock())
        return partial

    async def get(self, upload_id: str) -> Partial | None:
        """The upload, or None if there is none or it has expired (even if the sweep has not come by yet)."""
        if not _UPLOAD_ID.fullmatch(upload_id):
            return None
        partial = await self.db.transact(_get, upload_id)
        if partial is None or partial.expires_at <= self.clock():
            return None
        return partial

    def writer(self, upload_id: str, offset: int) -> contextlib.AbstractContextManager[PartialFile]:
        """The data file open for appending at `offset` (anything after it, never promised, is cut off)."""
        return _open_data(self.data_path(upload_id), offset)

    async def commit(self, upload_id: str, offset: int) -> float:
        """Promise `offset` bytes (already fsynced) to clients; returns the new expiry time."""
        expires_at = self.clock() + self.expiry_s
        await self.db.transact(_commit, upload_id, offset, expires_at)
        return expires_at

    async def complete(self, upload_id: str) -> None:
        """The upload was accepted: keep its row as a receipt until it expires, drop its bytes."""
        await self.db.transact(_complete, upload_id, self.clock() + self.expiry_s)
        await asyncio.to_thread(_unlink, self.data_path(upload_id))

    async def remove(self, upload_id: str) -> None:
        """Forget the upload and its bytes (terminated, refused or expired)."""
        await self.db.transact(_delete, [upload_id])
        await asyncio.to_thread(_unlink, self.data_path(upload_id))

    async def next_expiry(self) -> float | None:
        """When the soonest upload expires, or None if there is none."""
        return await self.db.transact(_next_expiry)

    async def sweep(self, *, busy: Callable[[str], bool] = lambda _: False) -> list[str]:
        """Remove expired uploads and their bytes, except those `busy` names (a request is at them)."""
        expired = [i for i in await self.db.transact(_expired, self.clock()) if not busy(i)]
        await self.db.transact(_delete, expired)
        for upload_id in expired:
            await asyncio.to_thread(_unlink, self.data_path(upload_id))
        return expired

    async def remove_strays(self) -> int:
        """At start-up only (no request can be creating one): remove data files that no upload accounts for."""
        known = set(await self.db.transact(_all_ids))
        return await asyncio.to_thread(_remove_strays, self.directory, known)


class PartialFile:
    """The data file of one upload, open at its end; writes and fsyncs run on a thread (the loop stays free)."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.offset = offset  # what is in the file so far (written, not necessarily synced)

    async def write(self, data: bytes) -> None:
        # A write that was started always finishes before this returns, even if the caller is cancelled:
        # nothing may write to the file after the request that owned it has let it go.
        writing = asyncio.ensure_future(asyncio.to_thread(_write_all, self.fd, data))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            await writing
            self.offset += len(data)  # it is in the file: the caller may keep it
            raise
        self.offset += len(data)

    async def sync(self) -> None:
        syncing = asyncio.ensure_future(asyncio.to_thread(os.fsync, self.fd))
        try:
            await asyncio.shield(syncing)
        except asyncio.CancelledError:
            await syncing
            raise

    def cut(self, offset: int) -> None:
        """Drop everything after `offset` (a PATCH whose bytes cannot be kept)."""
        os.ftruncate(self.fd, offset)
        os.lseek(self.fd, offset, os.SEEK_SET)
        self.offset = offset


@contextlib.contextmanager
def _open_data(path: Path, offset: int) -> Iterator[PartialFile]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        file = PartialFile(fd, offset)
        file.cut(offset)
        yield file
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _remove_strays(directory: Path, known: set[str]) -> int:
    removed = 0
    for entry in directory.iterdir() if directory.exists() else ():
        if entry.name.endswith(DATA_SUFFIX) and entry.name.removesuffix(DATA_SUFFIX) not in known:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _row(row: Row) -> Partial:
    return Partial(
        upload_id=row["upload_id"],
        length=row["length"],
        offset=row["offset"],
        metadata=row["metadata"],
        title=row["title"],
        renditions=row["renditions"],
        filename=row["filename"],
        complete=bool(row["complete"]),
        expires_at=row["expires_at"],
    )


def _insert(conn: Connection, partial: Partial, now: float) -> None:
    conn.execute(
        "INSERT INTO partials (upload_id, length, metadata, title, renditions, filename, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        partial.upload_id,
        partial.length,
        partial.metadata,
        partial.title,
        partial.renditions,
        partial.filename,
        now,
        partial.expires_at,
    )


def _get(conn: Connection, upload_id: str) -> Partial | None:
    row = conn.fetchrow("SELECT * FROM partials WHERE upload_id = ?", upload_id)
    return None if row is None else _row(row)


def _commit(conn: Connection, upload_id: str, offset: int, expires_at: float) -> None:
    conn.execute(
        'UPDATE partials SET "offset" = ?, expires_at = ? WHERE upload_id = ? AND complete = 0',
        offset,
        expires_at,
        upload_id,
    )


def _complete(conn: Connection, upload_id: str, expires_at: float) -> None:
    conn.execute(
        'UPDATE partials SET complete = 1, "offset" = length, expires_at = ? WHERE upload_id = ?',
        expires_at,
        upload_id,
    )


def _delete(conn: Connection, upload_ids: list[str]) -> None:
    conn.executemany("DELETE FROM partials WHERE upload_id = ?", [(i,) for i in upload_ids])


def _next_expiry(conn: Connection) -> float | None:
    soonest: Any = conn.fetchval("SELECT MIN(expires_at) FROM partials")
    return None if soonest is None else float(soonest)


def _expired(conn: Connection, now: float) -> list[str]:
    return [row[0] for row in conn.fetch("SELECT upload_id FROM partials WHERE expires_at <= ?", now)]


def _all_ids(conn: Connection) -> list[str]:
    return [row[0] for row in conn.fetch("SELECT upload_id FROM partials")]
