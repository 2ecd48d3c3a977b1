"""The embedded `EventStore`, part 1: plumbing, lifecycle and the log.

Every call runs as one transaction with the one connection (on a dedicated thread, or inline on the
event loop), so calls are serialized and each commits before its coroutine returns. The connection
is at `synchronous=NORMAL` throughout; what a call committed durably reaches the disk through an
explicit fdatasync of the WAL shared by every commit waiting for it (`router.stores.sqlite.durability`,
which says why that is as durable as FULL). The bus batches concurrent publishes into one `append`
call (group commit), and the store batches concurrent acks, nacks and extends the same way
(router.stores.sqlite.queues). After each commit the call's changes go to the notifier
(router.notifier); `SQLiteEventStore` (router.stores.sqlite) puts the parts together.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from router.cloudevents import Encoded
from router.fanout import Fanout, Handoffs
from router.notifier import Changes, Notifier
from router.persistence import Appended, Message, SpecCache, Subscription
from router.receipts import new_nonce, receipt_for
from router.settings import Durability
from router.stores.sqlite.durability import WalSync
from router.stores.sqlite.schema import SCHEMA, migrate

T = TypeVar("T")


log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 2000
"""Commits between PASSIVE WAL checkpoints, which run on a thread of their own (never inline, see `_run`)."""
WAL_LIMIT_BYTES = 64 * 1024 * 1024
"""Past this size the WAL is checkpointed and truncated between two commits (see `_truncate_wal`)."""
INLINE_APPEND_EVENTS = 32
INLINE_APPEND_BYTES = 64 * 1024
"""An append of at most this many events and bytes commits inline on the event loop when the connection is free:
bounded work, which blocks the loop for less than a hop to the store's thread costs (bench/inline_append.py)."""


class SQLiteCore:
    def __init__(
        self,
        path: Path,
        *,
        durability: Durability = "fsync",
        wal_limit_bytes: int = WAL_LIMIT_BYTES,
        replica_id: str | None = None,
    ) -> None:
        self.path = path
        self.replica_id = replica_id or uuid.uuid4().hex[:16]
        self._specs = SpecCache()
        self.wal_limit_bytes = wal_limit_bytes
        self._wal = path.with_name(path.name + "-wal")
        self._wal_sync = WalSync(self._wal, durability)
        self._wal_over_limit = False
        self._truncating = False
        self.write_failure: str | None = None
        """Why the last commit failed for want of storage (disk full, I/O error); None once one succeeds."""
        self._notifier: Notifier | None = None
        self._fanout = Fanout()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-sqlite")
        # One caller at a time on the connection: the store's thread, or the event loop inline (see `_run`).
        self._lock = threading.Lock()
        self._commits = 0
        self._checkpoint_due = False
        self._background: set[asyncio.Future[Any]] = set()
        # Checkpoints copy the WAL into the database with a connection and a thread of their own: a
        # PASSIVE checkpoint runs beside writers, so it never holds up a commit or an inline call.
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-sqlite-checkpoint")
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._conn: sqlite3.Connection | None = None
        # Filled on the store's thread during a call, published on the loop after its commit.
        self._touched: set[str] = set()
        self._ready: set[str] = set()
        self._hidden_until: dict[str, int] = {}
        self._catalog = False
        self._handoffs: Handoffs = {}

    # -- plumbing ---------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """Run `fn` with the connection: on the store's thread, or with `inline` right here on the event
        loop when the thread is not using the connection at that moment.

        `inline` is for short transactions of bounded work (leases, delivery outcomes, acks, small appends): a
        hop to the thread and back costs ~100-150 us of CPU on this machine, as much as such a transaction
        itself. No transaction syncs anything itself (synchronous=NORMAL): the WAL's fdatasync comes after, off
        the connection's lock and shared by every commit waiting for it (on the store's thread right after a
        call that ran there, on the sync thread for an inline one), so durable commits may run inline too.

        In `fsync` mode the call is answered (and its changes published, its leases handed off) only once
        every durable commit it could have read is on disk, its own included: nothing leaves the store
        that a power loss could take back (router.stores.sqlite.durability).
        """
        loop = asyncio.get_running_loop()
        if inline and self._conn is not None and self._lock.acquire(blocking=False):
            try:
                result, changes, handoffs, seen = self._call_locked(fn, args)
            finally:
                self._lock.release()
        else:
            result, changes, handoffs, seen = await loop.run_in_executor(self._executor, self._call, fn, args)
        if self._checkpoint_due:
            self._checkpoint_due = False
            self._in_background(loop.run_in_executor(self._checkpointer, self._checkpoint))
        if self._wal_over_limit and not self._truncating:  # one truncation queued at a time
            self._wal_over_limit, self._truncating = False, True
            truncation = loop.run_in_executor(self._executor, self._call, self._truncate_wal, ())
            truncation.add_done_callback(lambda _: setattr(self, "_truncating", False))
            self._in_background(truncation)
        try:
            await self._wal_sync.durable(seen)
        except OSError as exc:
            self._fanout.rolled_back(handoffs)  # committed, but not known to be on disk: nothing is handed out
            self.write_failure = storage_failure(exc) or f"cannot sync the WAL: {exc}"
            log.error("the bus's WAL could not be synced: %s", exc)
            raise
        if changes and self._notifier is not None:
            self._notifier.publish(changes)
        self._fanout.hand_off(handoffs)
        return result

    def _in_background(self, future: asyncio.Future[Any]) -> None:
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, Changes, Handoffs, int]:
        with self._lock:
            called = self._call_locked(fn, args)
        if self._wal_sync.mode == "fsync":  # synced here, the lock released: inline calls commit meanwhile
            try:
                self._wal_sync.sync_through(called[3])
            except OSError:
                pass  # `_run` tries again on the loop, and answers the error if it persists
        return called

    def _call_locked(self, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, Changes, Handoffs, int]:
        """Run `fn`; with its result, what it changed, and the durable commits it may have seen (its own included),
        which must be on disk before it is answered."""
        self._forget_changes()
        result = fn(*args)
        changes = Changes(frozenset(self._touched), frozenset(self._ready), self._hidden_until, self._catalog)
        return result, changes, self._handoffs, self._wal_sync.committed

    def _forget_changes(self) -> None:
        self._touched, self._ready, self._hidden_until, self._catalog, self._handoffs = set(), set(), {}, False, {}

    def _checkpoint(self) -> None:
        # Automatic checkpoints are off (an inline commit could otherwise copy the WAL on the loop).
        if self._checkpoint_conn is None:
            self._checkpoint_conn = sqlite3.connect(self.path, isolation_level=None)
        self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _truncate_wal(self) -> None:
        """Copy the whole WAL into the database and truncate it, on the store's connection between two
        commits (writers wait meanwhile: the store's thread is the only writer).

        PASSIVE checkpoints alone never bound the WAL under steady load: SQLite starts writing a WAL
        from its beginning again only when a checkpoint has copied all of it and no reader or writer
        is in the way, which a busy router never offers (issue 10: 107 MB to 449 MB in 25 s). The
        PASSIVE ones keep most frames copied already, so this one has only the remainder to copy.
        """
        if self._conn is None or (size := self._wal_bytes()) <= self.wal_limit_bytes:
            return
        started = time.perf_counter()
        busy, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        log.info("WAL of %d bytes checkpointed and truncated in %.0f ms", size, (time.perf_counter() - started) * 1000)
        if busy:
            log.warning(
                "WAL checkpoint (TRUNCATE) could not finish (%d of %d frames copied); next commit retries",
                copied,
                frames,
            )

    def _wal_bytes(self) -> int:
        try:
            return self._wal.stat().st_size
        except FileNotFoundError:
            return 0

    def _close_checkpointer(self) -> None:
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "store is not open"
        return self._conn

    @contextmanager
    def _transaction(self, *, bookkeeping: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. `bookkeeping` marks the delivery state (leases, push outcomes) whose loss
        in a power failure only means an event is delivered again, which at-least-once allows: it is not
        counted as durable, so nobody waits for its sync (it is safe against a process crash at COMMIT, as
        every commit here is); the next durable commit's fdatasync covers it. Published events, acks and
        subscription changes are durable commits (router.stores.sqlite.durability)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            if self._touched:  # every touched subscription's change counter moves on with the commit
                conn.executemany(
                    "UPDATE subscriptions SET version = version + 1 WHERE name = ?", [(n,) for n in self._touched]
                )
            conn.execute("COMMIT")
        except BaseException as exc:
            # SQLite may have rolled back already (SQLITE_FULL and SQLITE_IOERR can do that).
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if (failure := storage_failure(exc)) is not None:
                self.write_failure = failure
                log.error("the bus could not commit: %s", failure)
            self._fanout.rolled_back(self._handoffs)  # the leases handed off were rolled back
            self._forget_changes()
            raise
        self.write_failure = None
        self._commits += 1
        if not bookkeeping:
            self._wal_sync.commit()
        if self._commits % CHECKPOINT_EVERY == 0:
            self._checkpoint_due = True
        if self._wal_bytes() > self.wal_limit_bytes:
            self._wal_over_limit = True

    def _hide(self, sub: str, until_ms: int) -> None:
        self._touched.add(sub)
        self._hidden_until[sub] = min(until_ms, self._hidden_until.get(sub, until_ms))

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self, notifier: Notifier, fanout: Fanout) -> None:
        self._notifier, self._fanout = notifier, fanout
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # One level for every transaction: durable commits are synced by `WalSync`, off the connection's lock.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run off the loop: `_checkpoint`, `_truncate_wal`
        # Once a checkpoint has let the WAL start over, its file is cut back to this size.
        conn.execute(f"PRAGMA journal_size_limit={int(self.wal_limit_bytes)}")
        conn.executescript(SCHEMA)
        migrate(conn)
        self._conn = conn

    async def readiness(self) -> str | None:
        return None  # a full disk is `write_failure`'s to say; the file is always there to read

    def _read_subscriptions(self, conn: sqlite3.Connection) -> list[Subscription]:
        return self._specs.subscriptions(
            conn.execute("SELECT name, spec, secret, created_at, start_seq FROM subscriptions ORDER BY name")
        )

    def _catalog_version(self, conn: sqlite3.Connection) -> int:
        (version,) = conn.execute("SELECT version FROM catalog").fetchone()
        return int(version)

    def sync_due_at(self) -> float | None:
        """`batched` mode: when the WAL's next sync is due (the event loop's clock); None when nothing waits for one."""
        return self._wal_sync.due_at()

    async def close(self) -> None:
        await self._wal_sync.close()
        await asyncio.get_running_loop().run_in_executor(self._checkpointer, self._close_checkpointer)
        self._checkpointer.shutdown(wait=True)
        if self._conn is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        self.conn.close()
        self._conn = None

    # -- the log ----------------------------------------------------------------------------------

    async def append(self, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        # Small appends commit inline (in `fsync` mode the sync thread then syncs them, as for acks); big ones
        # on the store's thread, which syncs the WAL right after (bench/README.md, "Appends inline").
        small = len(events) <= INLINE_APPEND_EVENTS and sum(len(body) for _, body in events) <= INLINE_APPEND_BYTES
        return await self._run(self._append, events, now_ms, inline=small)

    def _append(self, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        with self._transaction() as conn:
            return self._append_in(conn, events, now_ms)

    def _append_in(self, conn: sqlite3.Connection, events: Sequence[Encoded], now_ms: int) -> list[Appended]:
        results: list[Appended] = []
        queued: list[tuple[str, int, str | None, int, int]] = []
        # The subscriptions committed as of this transaction, whoever committed them.
        catalog = self._fanout.at(self._catalog_version(conn), lambda: self._read_subscriptions(conn))
        nonce = new_nonce()
        for event, body in events:
            row = conn.execute(
                "INSERT INTO events (source, id, type, partitionkey, appended_at, body) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (source, id) DO NOTHING RETURNING seq",
                (event["source"], event["id"], event["type"], event.get("partitionkey"), now_ms, body),
            ).fetchone()
            if row is None:
                (seq,) = conn.execute(
                    "SELECT seq FROM events WHERE source = ? AND id = ?", (event["source"], event["id"])
                ).fetchone()
                results.append(Appended(event["id"], seq, duplicate=True))
                continue
            seq = row[0]
            results.append(Appended(event["id"], seq, duplicate=False))
            for sub, grant in self._fanout.targets(catalog, event):
                name = sub.spec.name
                self._touched.add(name)
                if grant is None:
                    queued.append((name, seq, event.get("partitionkey"), now_ms, now_ms))
                    self._ready.add(name)
                    continue
                # An idle dispatcher or a waiting stream granted a slot: the message is leased in this very
                # transaction (attempt 1, hidden for the grant's lease, held by this replica) and handed to it
                # after the commit (router.fanout).
                lease_ms = grant.lease_ms
                (msg_id,) = conn.execute(
                    "INSERT INTO messages (sub, seq, pkey, enqueued_at, visible_at, attempts, holder)"
                    " VALUES (?, ?, ?, ?, ?, 1, ?) RETURNING msg_id",
                    (name, seq, event.get("partitionkey"), now_ms, now_ms + lease_ms, self.replica_id),
                ).fetchone()
                receipt = receipt_for(msg_id, nonce)
                conn.execute("UPDATE messages SET receipt = ? WHERE msg_id = ?", (receipt, msg_id))
                self._handoffs.setdefault(grant, []).append(Message(receipt, 1, seq, body, now_ms))
                self._hide(name, now_ms + lease_ms)
        if queued:
            conn.executemany(
                "INSERT INTO messages (sub, seq, pkey, enqueued_at, visible_at) VALUES (?, ?, ?, ?, ?)", queued
            )
        return results


def storage_failure(exc: BaseException) -> str | None:
    """A sentence when `exc` means the store cannot write (disk full, I/O error), else None."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return "the disk is full (SQLITE_FULL)"
        if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
            return f"disk I/O error ({getattr(exc, 'sqlite_errorname', 'SQLITE_IOERR')})"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return f"cannot write: {exc.strerror}"
    return None
