"""The notifier for replicas over one PostgreSQL: LISTEN/NOTIFY, throttled, with a periodic re-check.

A commit's changes go to this replica's listeners at once, and to the other replicas as a NOTIFY on
the one connection each replica keeps for listening. NOTIFY serializes the commits that send one
(PostgreSQL takes a database-wide lock from the notifying commit's start until it is flushed), so a
publish storm must not send one per commit: notifications for a subscription go out at most once per
`throttle_s`, whatever changed in between merged into the next one, and every subscription due at
that moment shares one NOTIFY. They are sent after the data's commit, from their own session with
`synchronous_commit = off` (a notification needs no flush of its own).

NOTIFY is best-effort: a replica that dies between its commit and its NOTIFY, or a listening session
that is cut, loses wake-ups. So every `recheck_s` this replica's waiters all look again (and the
listening session is checked with a query), and after the session is re-established, once the
database is back, they look again at once. Only wake-ups travel this way, never data (router.notifier).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from router.notifier import Changes, InProcessNotifier, Listener
from router.stores.postgres.core import CONNECTION_ERRORS, Connection

log = logging.getLogger(__name__)

CHANNEL = "cattube_router"
MAX_PAYLOAD_BYTES = 7_000
"""Below PostgreSQL's 8,000-byte limit on a notification's payload: a bigger batch goes as several."""


@dataclass
class Pending:
    """What changed for one subscription since its last notification."""

    touched: bool = False
    ready: bool = False
    hidden_until: int | None = None

    def merge(self, touched: bool, ready: bool, hidden_until: int | None) -> None:
        self.touched |= touched
        self.ready |= ready
        if hidden_until is not None:
            self.hidden_until = hidden_until if self.hidden_until is None else min(self.hidden_until, hidden_until)


@dataclass
class Outbox:
    subs: dict[str, Pending] = field(default_factory=dict)
    catalog: bool = False


class PostgresNotifier:
    def __init__(
        self,
        connection: Connection | str,
        *,
        channel: str = CHANNEL,
        throttle_s: float = 0.025,
        recheck_s: float = 2.0,
    ) -> None:
        self.connection = Connection(connection) if isinstance(connection, str) else connection
        self.channel = channel
        self.throttle_s = throttle_s
        self.recheck_s = recheck_s
        self.connected = asyncio.Event()
        self.sent = 0
        """NOTIFY statements issued (counted as each is sent, before its answer)."""
        self._local = InProcessNotifier()
        self._outbox = Outbox()
        self._next_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = asyncio.Event()
        self._conn: asyncpg.Connection[Any] | None = None
        self._pid: int | None = None
        self._using = asyncio.Lock()
        """One statement at a time on the listening session (the sender's and the re-check's)."""
        self._tasks: list[asyncio.Task[None]] = []

    # -- the port ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background (a database that is away delays other replicas' wake-ups, nothing else)."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_listening(), name="router-notify-listen"),
            loop.create_task(self._send(), name="router-notify-send"),
            loop.create_task(self._recheck(), name="router-notify-recheck"),
        ]

    async def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._disconnect()

    def publish(self, changes: Changes) -> None:
        self._local.publish(changes)
        if changes.everything or not changes:
            return  # a re-check is this replica's own business
        outbox = self._outbox
        outbox.catalog |= changes.catalog
        for name in changes.touched | changes.ready | changes.hidden_until.keys():
            outbox.subs.setdefault(name, Pending()).merge(
                name in changes.touched, name in changes.ready, changes.hidden_until.get(name)
            )
        self._wake.set()

    def listen(self, listener: Listener) -> None:
        self._local.listen(listener)

    def unlisten(self, listener: Listener) -> None:
        self._local.unlisten(listener)

    # -- hearing others -----------------------------------------------------------------------------

    async def _keep_listening(self, backoff_initial_s: float = 0.25, backoff_max_s: float = 10.0) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._listen()
            except Exception as exc:  # away, or refusing us: the store's readiness says which; retry
                failures += 1
                ceiling = min(backoff_max_s, backoff_initial_s * 2 ** (failures - 1))
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                log.warning("cannot listen for other replicas' commits (%s); trying again in %.1f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                continue
            if failures or self._lost.is_set():
                # Notifications sent while this session was away are lost: everyone looks again.
                log.info("listening for other replicas' commits again")
                self._local.publish(Changes(catalog=True, everything=True))
            failures = 0
            self._lost.clear()
            self.connected.set()
            stop = asyncio.ensure_future(self._stopping.wait())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait([stop, lost], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                lost.cancel()
            self.connected.clear()
            await self._disconnect()

    async def _listen(self) -> None:
        c = self.connection
        conn = await asyncpg.connect(
            c.url,
            timeout=c.connect_timeout_s,
            server_settings={
                "application_name": "cattube-router-notify",
                "synchronous_commit": "off",  # a notification's commit waits for no flush
                "statement_timeout": str(int(c.statement_timeout_s * 1000)),
            },
        )
        try:
            await conn.add_listener(self.channel, self._heard)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda _: self._lost.set())
        self._conn, self._pid = conn, conn.get_server_pid()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:  # gone already, or not answering: cut it
                conn.terminate()

    def _heard(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        if pid == self._pid:
            return  # our own: this replica's listeners heard of it at the commit
        try:
            message = json.loads(str(payload))
            changes = Changes(
                touched=frozenset(message.get("t", ())),
                ready=frozenset(message.get("r", ())),
                hidden_until={name: int(at) for name, at in message.get("h", {}).items()},
                catalog=bool(message.get("c")),
            )
        except (ValueError, TypeError, AttributeError):
            log.warning("ignored a notification that is not one of ours: %.200r", payload)
            return
        self._local.publish(changes)

    # -- telling others ---------------------------------------------------------------------------

    async def _send(self) -> None:
        while not self._stopping.is_set():
            wait_s = self._due_in()
            if wait_s is None or wait_s > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                continue
            conn = self._conn
            if conn is None:  # not listening: other replicas learn of it from their next re-check
                self._outbox = Outbox()
                continue
            payloads = self._take_due()
            try:
                async with self._using:
                    for payload in payloads:
                        self.sent += 1
                        await conn.execute("SELECT pg_notify($1, $2)", self.channel, payload)
            except CONNECTION_ERRORS as exc:
                log.warning("could not notify the other replicas (%s); they re-check within %s s", exc, self.recheck_s)
                self._lost.set()
            except asyncpg.PostgresError as exc:
                log.warning("could not notify the other replicas (%s); they re-check within %s s", exc, self.recheck_s)

    def _due_in(self) -> float | None:
        """Seconds until the next notification may go (0: now), None when there is nothing to send."""
        outbox = self._outbox
        if outbox.catalog:
            return 0.0
        if not outbox.subs:
            return None
        now = time.monotonic()
        return max(0.0, min(self._next_at.get(name, 0.0) - now for name in outbox.subs))

    def _take_due(self) -> list[str]:
        """The payloads of everything due now (the rest waits for its subscription's throttle)."""
        now = time.monotonic()
        outbox = self._outbox
        due = {name: p for name, p in outbox.subs.items() if self._next_at.get(name, 0.0) <= now}
        for name in due:
            del outbox.subs[name]
            self._next_at[name] = now + self.throttle_s
        payloads: list[str] = []
        message: dict[str, Any] = {"c": True} if outbox.catalog else {}
        outbox.catalog = False
        for name, pending in due.items():
            part = _part(name, pending)
            if message and len(json.dumps(_joined(message, part))) > MAX_PAYLOAD_BYTES:
                payloads.append(json.dumps(message))
                message = {}
            message = _joined(message, part)
        if message:
            payloads.append(json.dumps(message))
        if len(self._next_at) > 10 * (len(outbox.subs) + len(due) + 100):
            self._next_at = {n: at for n, at in self._next_at.items() if at > now}  # forget old throttles
        return payloads

    # -- the re-check -----------------------------------------------------------------------------

    async def _recheck(self) -> None:
        """Every `recheck_s`: all waiters look again, and the listening session proves it is alive."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.recheck_s):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            self._local.publish(Changes(everything=True))
            conn = self._conn
            if conn is not None:
                try:
                    async with self._using:
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), self.recheck_s)
                except Exception as exc:  # a dead session, a timeout, the server refusing: listen anew
                    log.warning("the listening session does not answer (%s); connecting again", exc)
                    self._lost.set()


def _part(name: str, pending: Pending) -> dict[str, Any]:
    part: dict[str, Any] = {}
    if pending.touched:
        part["t"] = [name]
    if pending.ready:
        part["r"] = [name]
    if pending.hidden_until is not None:
        part["h"] = {name: pending.hidden_until}
    return part


def _joined(message: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    joined = dict(message)
    for key, value in part.items():
        if key == "h":
            joined["h"] = {**joined.get("h", {}), **value}
        else:
            joined[key] = [*joined.get(key, []), *value]
    return joined
