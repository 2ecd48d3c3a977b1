"""Streaming receive: a consumer that keeps a window of messages in flight, as NATS (`max_ack_pending`) and
AMQP (prefetch) do, over one long response (`POST /subscriptions/{name}/stream`, router.stream_api).

A stream holds at most `prefetch` messages leased to it and not yet acked, nacked or expired. It leases as
many as it has free slots, the same lease as receive's (receipts, visibility timeout, `max_receive_count`
and dead letters are the store's), and when that read leaves slots free it waits in the subscription's line
(router.signals) and offers those slots for hand-off (router.fanout): an append on this replica then leases
its new messages to the stream in its own transaction (attempt 1, hidden for the stream's visibility timeout,
held by this replica, as receive leases them) and hands them over after the commit, durable in `fsync` mode
(the store's `_run`), with no lease transaction or wake-up of its own. Messages made ready any other way
(a nack, an expiry, another replica's append, an append while a receive waited) come through the line as
before. Each ack or nack through this replica's bus frees the slot of a receipt it names, an extend moves
the slot's expiry, and a slot whose visibility timeout passes frees itself (the message is visible to
everyone again, this stream included). Acks made on another replica free a stream's slots only at their
expiry: a client acks where it streams from (the SDK does). A stream that ends takes its offer back, and
releases at once what was handed to it and not sent, including what a commit hands over afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING

from router.fanout import Grant
from router.persistence import Message, ReceiptResult, now_ms
from router.signals import Signal
from services.common.errors import Unavailable

if TYPE_CHECKING:
    from router.bus import Bus

log = logging.getLogger(__name__)


class Window:
    """The leases one stream holds: receipt -> the moment (ms) its message is visible again."""

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.held: dict[str, int] = {}
        self._expiries: list[tuple[int, str]] = []  # a heap; entries whose receipt moved on are skipped
        self.freed = asyncio.Event()
        self.on_settled: Callable[[], bool] = lambda: False
        """Called when an ack or nack frees a slot; True if it took the slot itself (the stream need not wake)."""

    @property
    def free(self) -> int:
        return self.prefetch - len(self.held)

    def hold(self, receipt: str, until_ms: int) -> None:
        self.held[receipt] = until_ms
        heapq.heappush(self._expiries, (until_ms, receipt))

    def extend(self, receipt: str, until_ms: int) -> None:
        if receipt in self.held:
            self.hold(receipt, until_ms)

    def settle(self, receipt: str) -> None:
        if self.held.pop(receipt, None) is not None and not self.on_settled():
            self.freed.set()

    def expire(self, at_ms: int) -> int | None:
        """Free the slots whose visibility timeout has passed; returns when the next one passes."""
        while self._expiries:
            until, receipt = self._expiries[0]
            if self.held.get(receipt) != until:  # settled, or extended (a later entry stands for it)
                heapq.heappop(self._expiries)
            elif until <= at_ms:
                heapq.heappop(self._expiries)
                self.settle(receipt)
            else:
                return until
        return None


class Stream:
    """One open stream: its window, its grant of free slots for hand-off, and what was handed to it not yet sent."""

    def __init__(self, streams: Streams, name: str, prefetch: int, visibility_ms: int, gone: asyncio.Event) -> None:
        self.streams = streams
        self.name = name
        self.window = Window(prefetch)
        self.visibility_ms = visibility_ms
        self.gone = gone
        self.grant = Grant(name, self.take)
        self.handed: list[Message] = []
        self.ended = False
        self.offering = False
        """Waiting with its free slots offered for hand-off: a slot freed meanwhile is simply offered too."""
        self.window.on_settled = self._settled

    def _settled(self) -> bool:
        # One slot more for appends to take, without a round of the stream's loop (one per ack, else).
        return self.offering and self.streams.bus.fanout.grow(self.grant, 1)

    def take(self, messages: list[Message]) -> None:
        """Messages an append leased to this stream, after their commit (on the loop): held, sent next."""
        if self.ended or self.gone.is_set():
            self.streams.release_soon(self.name, messages)  # the client is gone: visible again at once
            return
        for message in messages:
            # The lease began at the append's clock, which is the message's enqueued time.
            self.window.hold(message.receipt, message.enqueued_at_ms + self.visibility_ms)
            self.streams.holding(message.receipt, self.window)
        self.handed.extend(messages)
        self.window.freed.set()  # wakes the stream (one event for every reason to look again)


class Streams:
    """This replica's streams: their windows by receipt, and the cap on how many run at once."""

    def __init__(self, bus: Bus, max_streams: int) -> None:
        self.bus = bus
        self.max_streams = max_streams
        self.open = 0
        self._windows: dict[str, Window] = {}
        self._releases: set[asyncio.Task[None]] = set()

    def holding(self, receipt: str, window: Window) -> None:
        self._windows[receipt] = window

    def release_soon(self, name: str, messages: Sequence[Message]) -> None:
        """Release messages handed to a stream that is gone (from a callback: in a task of its own)."""
        if messages:
            task = asyncio.get_running_loop().create_task(self._release(name, [m.receipt for m in messages]))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, name: str, receipts: list[str]) -> None:
        try:
            await self.bus.store.release(name, receipts, now_ms())
        except Exception as exc:  # their leases lapse instead: visible again after the visibility timeout
            log.warning("messages handed to a closed stream of %s not released (%r)", name, exc)

    async def close(self) -> None:
        """Before the store closes: the releases under way finish."""
        await asyncio.gather(*self._releases, return_exceptions=True)

    def settled(self, results: Sequence[ReceiptResult]) -> None:
        """Acked or nacked (or not held any more at all): the slots of those receipts are free."""
        for result in results:
            window = self._windows.pop(result.receipt, None)
            if window is not None:
                window.settle(result.receipt)

    def extended(self, results: Sequence[ReceiptResult], visibility_timeout_ms: int) -> None:
        until = now_ms() + visibility_timeout_ms
        for result in results:
            window = self._windows.get(result.receipt)
            if window is None:
                continue
            if result.ok:
                window.extend(result.receipt, until)
            else:  # the lease is gone already (expired and claimed again)
                del self._windows[result.receipt]
                window.settle(result.receipt)

    def admit(self) -> None:
        """Count a new stream in, or refuse it (503) past the cap."""
        if self.open >= self.max_streams:
            raise Unavailable(
                f"this router serves {self.max_streams} streams already (CATTUBE_MAX_STREAMS);"
                " try again later, or receive with long polls"
            )
        self.open += 1

    def done(self) -> None:
        self.open -= 1

    async def run(
        self,
        name: str,
        prefetch: int,
        visibility_timeout_s: float,
        heartbeat_s: float,
        gone: asyncio.Event,
    ) -> AsyncGenerator[list[Message], None]:
        """Yield batches of newly leased messages, and an empty batch when a heartbeat is due; ends on shutdown,
        when `gone` is set (the client hung up) or when the subscription is deleted (NotFound). The caller
        releases what it could not send (`store.release`), and counts the stream in and out (`admit`, `done`)."""
        bus = self.bus
        loop = asyncio.get_running_loop()
        stream = Stream(self, name, prefetch, int(visibility_timeout_s * 1000), gone)
        window, grant = stream.window, stream.grant
        wake = window.freed  # set by acks, nacks and expiries freeing slots, by hand-offs, by a turn in line
        ending = loop.create_task(_set_when_any(wake, gone, bus.stopped))
        signal: Signal | None = None
        turn: asyncio.Future[None] | None = None
        read = True  # the store may hold messages for us: lease before offering slots for hand-off
        try:
            sub = await bus.queue(name)
            heartbeat_at = loop.time() + heartbeat_s
            while not (bus.stopping or gone.is_set()):
                stream.offering = False
                bus.fanout.withdraw(grant)  # offered again below with what is free now
                wake.clear()  # every reason to wake is looked at again from here on: none is lost
                if stream.handed:
                    messages, stream.handed = stream.handed, []
                    heartbeat_at = loop.time() + heartbeat_s
                    yield messages
                    continue
                next_expiry_ms = window.expire(now_ms())
                until = heartbeat_at
                if next_expiry_ms is not None:
                    until = min(until, loop.time() + max(0.0, next_expiry_ms - now_ms()) / 1000 + 0.001)
                free = window.free - grant.pending  # slots taken by appends not yet handed over are not free
                if free > 0 and read:
                    if turn is not None and signal is not None and not turn.done():  # a turn that came: used here
                        signal.leave(turn)
                    signal = bus.signals[name]  # looked up each time: a deleted subscription's line is forgotten
                    turn = signal.join()  # in line before the read: no lost wake-ups (router.signals)
                    turn.add_done_callback(lambda _: wake.set())
                    messages = await self._lease(name, sub.spec.delivery.max_receive_count, stream, free)
                    if gone.is_set():
                        break
                    # A partial read leaves the line to wake us for what it did not see; a full one may have left
                    # some behind (the next in line may take them, and we read again).
                    read = len(messages) == free
                    if read:
                        signal.leave(turn)
                        turn = None
                        signal.ready(1)
                    if messages:
                        heartbeat_at = loop.time() + heartbeat_s
                        yield messages
                        continue
                elif free <= 0 and turn is not None and signal is not None and turn.done():
                    # A full window takes nothing: a turn that came is passed on, and a freed slot reads first. (While
                    # no turn comes it stays in line: a freed slot is then offered at once, no read needed.)
                    signal.leave(turn)
                    turn, read = None, True
                if free > 0 and not sub.spec.delivery.ordered:
                    # Waiting in line with slots free: new messages appended here are leased to us in their commit.
                    bus.fanout.offer(grant, free, stream.visibility_ms)
                    stream.offering = True
                if not (stream.handed or (turn is not None and turn.done()) or gone.is_set() or bus.stopping):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, until - loop.time())):
                            await wake.wait()
                if turn is not None and turn.done():  # woken in line: read again (which uses the wake-up)
                    read = True
                if loop.time() >= heartbeat_at and not (bus.stopping or gone.is_set() or stream.handed):
                    heartbeat_at = loop.time() + heartbeat_s
                    yield []
                sub = await bus.queue(name)  # deleted meanwhile: NotFound ends the stream
        finally:
            stream.ended, stream.offering = True, False
            bus.fanout.withdraw(grant)  # what appends take from here on is released as it is handed over
            ending.cancel()
            if turn is not None and signal is not None:
                signal.leave(turn)  # passes on a wake-up that came meanwhile
            if stream.handed:  # handed over, never sent
                handed, stream.handed = stream.handed, []
                self.release_soon(name, handed)
            for receipt in window.held:
                self._windows.pop(receipt, None)
            window.held.clear()

    async def _lease(self, name: str, max_receive_count: int, stream: Stream, free: int) -> list[Message]:
        """Lease up to `free` messages for `stream` (released at once if its client hung up meanwhile)."""
        at = now_ms()
        messages = await self.bus.store.receive(name, free, stream.visibility_ms, at, max_receive_count)
        if messages and stream.gone.is_set():
            await self.bus.store.release(name, [m.receipt for m in messages], now_ms())
            return []
        for message in messages:
            stream.window.hold(message.receipt, at + stream.visibility_ms)
            self._windows[message.receipt] = stream.window
        return messages


async def _set_when_any(wake: asyncio.Event, *events: asyncio.Event) -> None:
    """Set `wake` once any of `events` is set (one task per stream, not a waiter per round)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        wake.set()
    finally:
        for waiter in waiters:
            waiter.cancel()
