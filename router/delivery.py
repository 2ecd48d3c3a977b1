"""Push delivery: one dispatcher per push subscription POSTs each matching event to its URL.

A dispatcher leases at most `max_in_flight` messages at a time from the store (so a huge backlog
never sits in memory), sends each over a pooled keep-alive aiohttp session (plain httpx costs
~2 ms of CPU per request under concurrency here, bench/README.md, "HTTP clients"), and commits the outcome of every
attempt before it moves on: 2xx acks; 408, 429, 5xx, timeouts and connection errors are retried
with exponential backoff and full jitter (honouring `Retry-After`); any other 4xx, or running out
of `max_attempts` / `max_age_s`, dead-letters the message. Connections go only to addresses the
push policy allows (router.push_policy; a refusal is permanent and says only "refused by policy"),
and redirects are never followed: a 3xx is a failed attempt, retried like a 5xx. The lease outlives the attempt's
timeout and names the replica that holds it; a dispatcher starting up releases its own replica's
leases at once and leaves any other holder's (a live replica's, or a crashed incarnation's) to
expire, after which they are leased again: a crash mid-delivery means the event is delivered again
(at least once) with its attempt count intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from standardwebhooks.webhooks import Webhook

from router.batching import GroupCommit
from router.fanout import Fanout, Grant
from router.persistence import EventStore, Message, Settlement, Subscription, now_ms
from router.push_policy import REFUSED, PushPolicy, TargetRefused
from router.signals import Signals
from services.common.errors import Unavailable
from services.common.timestamps import iso_utc

log = logging.getLogger(__name__)

RETRYABLE = frozenset({408, 429})
PAUSE_INITIAL_S = 0.5
PAUSE_MAX_S = 10.0
"""A dispatcher whose store does not answer pauses this long at first, doubling up to the most."""
LEASE_MARGIN_S = 5.0
"""A lease outlives one attempt's timeout by this much, so a live attempt never loses it."""


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    retry: bool = False
    status: int | None = None
    error: str = ""
    retry_after_s: float | None = None


def backoff_s(attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter, between `initial_s` and `max_s`: attempt n waits
    uniform(initial, min(max, initial * 2**(n-1)))."""
    ceiling = min(max_s, initial_s * 2 ** min(max(0, attempt - 1), 64))  # no float overflow past attempt 1,025
    return (rng or random).uniform(min(initial_s, ceiling), ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds, from delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def request_for(message: Message, mode: str, signer: Webhook) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery, signed per Standard Webhooks.

    Binary mode carries the attributes in `ce-*` headers and `data` as the body. An event whose
    data is binary (`data_base64`) goes in structured mode all the same: Standard Webhooks signs
    text, and every library that verifies it decodes the body as UTF-8.
    """
    event = json.loads(message.event) if mode == "binary" else None
    if event is not None and "data_base64" not in event:
        data = event.pop("data", None)
        content_type = event.pop("datacontenttype", "application/json")
        headers = {f"ce-{name}": _header_value(value) for name, value in event.items()}
        headers["content-type"] = content_type
        if data is None:
            body = b""
        elif isinstance(data, str) and not _is_json(content_type):
            body = data.encode()
        else:
            body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    else:
        body = message.event
        headers = {"content-type": "application/cloudevents+json"}
    webhook_id = f"msg_{message.sequence}" + (f"_{message.replay}" if message.replay else "")
    now = datetime.now(UTC)
    headers["webhook-id"] = webhook_id
    headers["webhook-timestamp"] = str(int(now.timestamp()))
    headers["webhook-signature"] = signer.sign(webhook_id, now, body.decode())
    return body, headers


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _header_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Dispatcher:
    """Delivers one push subscription's messages until stopped."""

    def __init__(
        self, sub: Subscription, store: EventStore, signals: Signals, policy: PushPolicy, fanout: Fanout
    ) -> None:
        self.sub = sub
        self.policy = policy
        self.store = store
        self.signals = signals
        self.fanout = fanout
        self.name = sub.spec.name
        self._signer = Webhook(sub.secret)  # decodes the secret once, not per request
        self._timeout = aiohttp.ClientTimeout(total=sub.spec.delivery.timeout_s)
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        """Set when a slot frees up, the subscription's queue changes, or the dispatcher stops."""
        self._grant = Grant(self.name, self.take)
        """Slots offered to the fan-out for hand-off (`slots`), or taken and not yet handed over (`pending`)."""
        self._maybe_ready = True
        """False only when the last lease found nothing more and nothing was made visible since."""
        self._ready_marks = 0
        self._session: aiohttp.ClientSession | None = None
        self._outcomes: GroupCommit[Settlement, None] = GroupCommit(f"push:{self.name}", self._settle)
        self._failures = 0
        """Store calls failed in a row (the database is away): how long to pause before the next."""

    def update(self, sub: Subscription) -> None:
        """A re-PUT changed the URL or the delivery policy: the next leases use them."""
        self.sub = sub
        # An outstanding offer was made under the old policy (say, unordered): take it back.
        self.fanout.withdraw(self._grant)
        self.signals[self.name].bump()

    def mark_ready(self) -> None:
        """Messages may have become visible (queued, released, or a hidden one's time came)."""
        self._maybe_ready = True
        self._ready_marks += 1

    def stop(self) -> None:
        self._stopping.set()
        self.fanout.withdraw(self._grant)
        self._wake.set()

    async def run(self) -> None:
        delivery = self.sub.spec.delivery
        connector = self.policy.connector(limit=max(delivery.max_in_flight, 1))
        async with aiohttp.ClientSession(connector=connector) as session:
            while not self._stopping.is_set():
                try:
                    await self.store.release_leases(self.name, now_ms())
                    break
                except Unavailable as exc:
                    await self._pause(exc)
            self._failures = 0
            settler = asyncio.create_task(self._outcomes.run())
            try:
                await self._loop(session)
            finally:
                # In-flight attempts are cut short: their leases lapse and they are delivered again later.
                for task in self._in_flight:
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)
                self._outcomes.stop()
                await settler

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        signal = self.signals[self.name]
        signal.watch(self._wake.set)  # one event for every reason to look again: no waiter tasks per round
        try:
            while not self._stopping.is_set():
                self._wake.clear()  # before any read: a change from here on sets it again
                delivery = self.sub.spec.delivery
                self.fanout.withdraw(self._grant)
                free = delivery.max_in_flight - len(self._in_flight) - self._grant.pending
                if free <= 0:
                    await self._wake.wait()
                    continue
                lease_ms = int((delivery.timeout_s + LEASE_MARGIN_S) * 1000)
                messages: list[Message] = []
                # Ordered delivery leases every time: a key unblocks when its head is acked, which no hint follows.
                if delivery.ordered or self._maybe_ready:
                    marks = self._ready_marks
                    try:
                        messages = await self.store.lease(self.name, free, lease_ms, now_ms(), delivery.ordered)
                    except Unavailable as exc:  # the database is away: look again later, do not die
                        await self._pause(exc)
                        continue
                    self._failures = 0
                    self._start(messages)
                    if len(messages) == free:
                        continue
                    if marks == self._ready_marks:  # nothing was made visible while we leased
                        self._maybe_ready = False
                if not delivery.ordered:
                    # Idle: new matching events are leased to us in the commit that appends them.
                    self.fanout.offer(self._grant, free - len(messages), lease_ms)
                await self._wake.wait()
        finally:
            signal.unwatch(self._wake.set)

    async def _pause(self, exc: Unavailable) -> None:
        """Back off (exponentially, with jitter) after the store failed to answer, or until stopped."""
        self._failures += 1
        ceiling = min(PAUSE_MAX_S, PAUSE_INITIAL_S * 2 ** (self._failures - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        log.warning("push to %s paused for %.1f s: %s", self.name, delay, exc.detail)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()

    def take(self, messages: list[Message]) -> None:
        """Messages the store leased to us in an append's commit."""
        if self._session is None or self._stopping.is_set():
            return  # their leases lapse and they are delivered again
        self._start(messages)

    def _start(self, messages: list[Message]) -> None:
        assert self._session is not None
        for message in messages:
            task = asyncio.create_task(self._deliver(self._session, message))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            if isinstance(exc, Unavailable):  # its outcome was not recorded: the lease lapses, it goes out again
                log.warning("delivery to %s: its outcome could not be stored (%s)", self.name, exc.detail)
            else:
                log.error("delivery to %s failed unexpectedly", self.name, exc_info=exc)

    async def _deliver(self, session: aiohttp.ClientSession, message: Message) -> None:
        outcome = await self._attempt(session, message)
        # Committed (with the other deliveries' outcomes of the moment) before the slot is freed.
        await self._outcomes.submit(self._settlement(message, outcome))

    def _settlement(self, message: Message, outcome: Outcome) -> Settlement:
        if outcome.ok:
            return Settlement(message.receipt, "ack")
        delivery = self.sub.spec.delivery
        limit = None
        if not outcome.retry:
            limit = "permanent"
        elif message.attempt >= delivery.max_attempts:
            limit = "max_attempts"
        elif now_ms() - message.enqueued_at_ms >= delivery.max_age_s * 1000:
            limit = "max_age_s"
        if limit is not None:
            reason = f"{outcome.error} ({'a permanent failure' if limit == 'permanent' else limit + ' exhausted'})"
            log.warning("dead-letter seq %d for %s: %s", message.sequence, self.name, reason)
            context = {
                "limit": limit,
                "status": outcome.status,
                "error": outcome.error,
                "last_attempt_at": iso_utc(),
            }
            return Settlement(message.receipt, "dead", error=reason, context=context)
        delay_s = backoff_s(message.attempt, delivery.backoff_initial_s, delivery.backoff_max_s)
        if outcome.retry_after_s is not None:
            delay_s = min(outcome.retry_after_s, delivery.backoff_max_s)
        return Settlement(message.receipt, "retry", delay_ms=int(delay_s * 1000), error=outcome.error)

    async def _settle(self, settlements: list[Settlement]) -> list[None]:
        await self.store.settle(self.name, settlements, now_ms())
        return [None] * len(settlements)

    async def _attempt(self, session: aiohttp.ClientSession, message: Message) -> Outcome:
        spec = self.sub.spec
        url = spec.target["url"]
        body, headers = request_for(message, spec.delivery.mode, self._signer)
        if self._timeout.total != spec.delivery.timeout_s:
            self._timeout = aiohttp.ClientTimeout(total=spec.delivery.timeout_s)
        try:
            # Redirects are never followed: a 307 would re-POST the signed body to wherever it points.
            post = session.post(url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False)
            async with post as response:
                await response.read()
                status = response.status
                retry_after = None if status < 300 else parse_retry_after(response.headers.get("Retry-After"))
                location = response.headers.get("Location", "")
        except TimeoutError:
            return Outcome(False, retry=True, error=f"timed out after {spec.delivery.timeout_s}s")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, TargetRefused):  # permanent, and nothing about the address or port
                return Outcome(False, retry=False, error=REFUSED)
            return Outcome(False, retry=True, error=f"{type(exc).__name__}: {exc}")
        except aiohttp.ClientError as exc:
            return Outcome(False, retry=True, error=f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return Outcome(True, status=status)
        if 300 <= status < 400:  # a failed attempt, retried as webhook senders do
            error = f"HTTP {status}: redirect to {location[:200]!r} not followed"
            return Outcome(False, retry=True, status=status, error=error, retry_after_s=retry_after)
        retry = status in RETRYABLE or status >= 500
        return Outcome(False, retry=retry, status=status, error=f"HTTP {status}", retry_after_s=retry_after)


class Dispatchers:
    """The running dispatchers, one per push subscription, started and stopped as subscriptions change."""

    def __init__(self, store: EventStore, signals: Signals, policy: PushPolicy, fanout: Fanout) -> None:
        self.store = store
        self.signals = signals
        self.policy = policy
        self.fanout = fanout
        self.failures: dict[str, str] = {}
        self._running: dict[str, tuple[Dispatcher, asyncio.Task[None]]] = {}

    async def sync(self, sub: Subscription) -> None:
        name = sub.spec.name
        if sub.spec.is_queue:
            await self.remove(name)  # it may have been a push subscription before this PUT
            return
        if name in self._running:
            running = self._running[name][0].sub
            if not (running.spec.same_as(sub.spec) and running.secret == sub.secret):
                self._running[name][0].update(sub)
            return
        dispatcher = Dispatcher(sub, self.store, self.signals, self.policy, self.fanout)
        task = asyncio.create_task(dispatcher.run(), name=f"push:{name}")
        task.add_done_callback(lambda t: self._ended(name, t))
        self._running[name] = (dispatcher, task)

    def _ended(self, name: str, task: asyncio.Task[None]) -> None:
        entry = self._running.get(name)
        if entry is not None and entry[1] is task:
            del self._running[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.failures[name] = f"push dispatcher for {name} stopped: {exc!r}"
            log.error("push dispatcher for %s stopped", name, exc_info=exc)

    @property
    def names(self) -> set[str]:
        return set(self._running)

    def mark_ready(self, names: Iterable[str]) -> None:
        for name in names:
            entry = self._running.get(name)
            if entry is not None:
                entry[0].mark_ready()

    async def readiness(self) -> str | None:
        return "; ".join(self.failures.values()) or None

    def stop(self) -> None:
        """Lease nothing more (shutdown has begun); attempts under way go on until `close`."""
        for dispatcher, _ in self._running.values():
            dispatcher.stop()

    async def remove(self, name: str) -> None:
        entry = self._running.pop(name, None)
        if entry is not None:
            entry[0].stop()
            await asyncio.gather(entry[1], return_exceptions=True)

    async def close(self) -> None:
        for name in list(self._running):
            await self.remove(name)
