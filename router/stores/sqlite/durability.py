"""When the bus's commits reach the disk: an explicit fdatasync of the WAL, shared by every commit waiting for it.

The store's connection stays at `synchronous=NORMAL` for every transaction (switching the pragma before each
one cost 7 % of the router's time under load, issue 14). A commit at NORMAL has written its frames to the WAL
file (in the page cache: safe against a crash of the process at once) but not synced it; `WalSync` syncs it:

- `fsync` mode: a call that committed something durable (an event, an ack) is answered only after an
  fdatasync of the WAL that started after its COMMIT. One fdatasync answers every commit made before it
  started (group fsync), and it runs off the connection's lock, so other transactions commit while the
  disk syncs: on the store's thread right after a transaction it ran (no second hop between threads), or
  on a long-lived thread of its own for a call that ran inline on the event loop. That thread sleeps on a
  lock every ask releases, and wakes the loop once per fdatasync for every waiter it covered
  (one `call_soon_threadsafe`), instead of an executor round, a task and a shielded future per sync.
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
from pathlib import Path

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
        # The sync thread's inbox: the highest commit number asked for, and a lock it sleeps on, held until a
        # caller releases it (a C-level wake-up: a Condition costs a lock and Python frames per wait).
        self._wanted = 0
        self._kick = threading.Lock()
        self._kick.acquire()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        """Calls on the loop waiting for a commit number to be on disk (the loop's own list: only it touches it)."""
        self._timer: asyncio.TimerHandle | None = None

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
        done = asyncio.get_running_loop().create_future()
        self._waiters.append((upto, done))
        self._ask(upto)
        # A waiter that goes away leaves the sync to the others: `_answer` skips a cancelled future.
        await done

    def _ask(self, upto: int) -> None:
        """Ask the sync thread for an fdatasync covering commit `upto` (from the loop; it answers on the loop)."""
        self._loop = asyncio.get_running_loop()  # the thread answers on the loop that asked last
        self._wanted = max(self._wanted, upto)
        if self._thread is None:
            self._thread = threading.Thread(target=self._syncing, name="router-sqlite-fsync", daemon=True)
            self._thread.start()
        self._wake_thread()

    def _wake_thread(self) -> None:
        try:
            self._kick.release()
        except RuntimeError:  # a wake-up is pending: the thread reads `_wanted` after taking it
            pass

    def _syncing(self) -> None:
        """The sync thread: one fdatasync per wake-up for whatever was asked meanwhile, one wake-up of the loop."""
        while True:
            self._kick.acquire()
            if self._closing:
                return
            upto = self._wanted
            failure: OSError | None = None
            try:
                self.sync_through(upto)
            except OSError as exc:
                failure = exc
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._answer, upto, failure)
            except RuntimeError:  # the loop is closed: nobody is left to answer
                return

    def _answer(self, tried: int, failure: OSError | None) -> None:
        """On the loop: answer every waiter the last sync covered, or, when it failed, every waiter it was for
        (up to commit `tried`); the others asked after it started, and the thread has their wake-up."""
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        for upto, done in self._waiters:
            if done.done():
                continue
            if upto <= self.synced:
                done.set_result(None)
            elif failure is not None and upto <= tried:
                done.set_exception(failure)
            else:
                waiting.append((upto, done))
        self._waiters = waiting
        if failure is not None and not self._waiters:
            log.error("the bus's WAL could not be synced: %s", failure)

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
        self._ask(self.committed)  # nobody waits: a failure is logged by `_answer`

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
            self._closing = True
            self._wake_thread()
            if self._thread is not None:
                await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
                self._thread = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
