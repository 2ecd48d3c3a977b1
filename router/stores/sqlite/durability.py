"""When the bus's commits reach the disk: an explicit fdatasync of the WAL, shared by every commit waiting for it.

The store's connection stays at `synchronous=NORMAL` for every transaction (switching the pragma before each
one cost 7 % of the router's time under load, issue 14). A commit at NORMAL has written its frames to the WAL
file (in the page cache: safe against a crash of the process at once) but not synced it; `WalSync` syncs it:

- `fsync` mode: a call that committed something durable (an event, an ack) is answered only after an
  fdatasync of the WAL that started after its COMMIT. One fdatasync answers every commit made before it
  started (group fsync), and it runs off the connection's lock, so other transactions commit while the
  disk syncs: on the store's thread right after a transaction it ran (no second hop between threads), or
  on a thread of its own for a call that ran inline on the event loop.
- `batched` mode: the first durable commit after a sync arms a timer; SYNC_DELAY_S later one fdatasync covers
  everything committed meanwhile. Nothing runs while the router is idle.

Why this is exactly as durable as `synchronous=FULL` (SQLite's wal.c, `sqlite3WalFrames` and `walCheckpoint`):
FULL differs from NORMAL in WAL mode by one sync only, of the WAL file after a commit's frames are written
(`WAL_SYNC_FLAGS`); the other syncs are the checkpoint's (`CKPT_SYNC_FLAGS`), which NORMAL keeps: the WAL
before a checkpoint copies it, the database file after, and the WAL's header each time the WAL starts over
from its beginning. The frames of commit N are never overwritten until the WAL starts over, which needs a
checkpoint that copied them into the database file and synced it. So an fdatasync of the WAL file (one
inode: any descriptor syncs the pages every writer put there) that starts after commit N returns with
commit N on disk, in the WAL or, if it was restarted meanwhile, in the synced database file; recovery
reads the WAL up to its last valid commit frame, as after FULL. Unix SQLite reports powersafe overwrite,
so FULL pads no frames either. One difference remains: under FULL a commit is visible to other transactions
only once synced, here at COMMIT. So in `fsync` mode no call answers (nor wakes a waiter or hands a leased
message to a dispatcher) before every durable commit it could have read is synced (`SQLiteCore._run`): a
receive never hands out an event whose publisher has not had its 202.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from router.settings import Durability

log = logging.getLogger(__name__)

SYNC_DELAY_S = 0.5
"""`batched`: from the first durable commit after a sync to the next sync. With the fdatasync's own time, each
commit is on disk within a second of its answer (Redis's `appendfsync everysec`)."""


def sync_file(fd: int) -> None:
    """The sync itself (tests replace it to watch and hold it)."""
    os.fdatasync(fd)


class WalSync:
    def __init__(self, wal: Path, mode: Durability) -> None:
        self.wal = wal
        self.mode = mode
        self.committed = 0
        """Durable commits made so far (counted under the connection's lock, right after COMMIT)."""
        self.synced = 0
        """Durable commits the last finished fdatasync covered."""
        self._fd: int | None = None
        self._sync_lock = threading.Lock()
        """One fdatasync at a time, on whichever thread: a caller that waited for it finds its commit covered."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-sqlite-fsync")
        self._syncing: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()

    def commit(self) -> int:
        """Count a durable commit (on whichever thread holds the connection); returns its number."""
        self.committed += 1
        return self.committed

    async def durable(self, upto: int) -> None:
        """Return once the durable commits up to number `upto` are on disk: at once in `batched` mode (a timer
        syncs them within SYNC_DELAY_S), after a shared fdatasync in `fsync` mode."""
        if upto <= self.synced:
            return
        if self.mode == "batched":
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(SYNC_DELAY_S, self._due)
            return
        await self._wait(upto)

    async def _wait(self, upto: int) -> None:
        while self.synced < upto:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync())
            # One sync for every waiter; a waiter that goes away does not cancel it for the others.
            await asyncio.shield(self._syncing)

    async def _sync(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.sync_through, self.committed)
        finally:
            self._syncing = None

    def sync_through(self, upto: int) -> None:
        """Block until the durable commits up to number `upto` are on disk (any thread; not under the connection's
        lock): an fdatasync, unless one that started after them has finished meanwhile."""
        with self._sync_lock:
            if upto <= self.synced:
                return
            target = self.committed  # read before the sync starts: every commit counted so far is in the page cache
            if self._fd is None:  # the WAL exists from the first write on; it is not replaced while the store is open
                self._fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
            sync_file(self._fd)
            self.synced = max(self.synced, target)

    def _due(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._wait(self.committed))
        self._background.add(task)
        task.add_done_callback(self._synced_in_background)

    def _synced_in_background(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("the bus's WAL could not be synced: %s", exc)

    def due_at(self) -> float | None:
        """When the next `batched` sync is due (the loop's clock), None when none is scheduled."""
        return self._timer.when() if self._timer is not None else None

    async def close(self) -> None:
        """Sync what is left (a `batched` commit not yet on disk), then let go of the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            if self.committed > self.synced and self.wal.exists():
                await self._wait(self.committed)
        finally:
            await asyncio.gather(*self._background, return_exceptions=True)
            self._executor.shutdown(wait=True)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
