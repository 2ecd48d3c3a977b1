"""Streaming receive: a consumer that keeps a window of messages in flight, as NATS (`max_ack_pending`) and
AMQP (prefetch) do, over one long response (`POST /subscriptions/{name}/stream`, router.stream_api).

A stream holds at most `prefetch` messages leased to it and not yet acked, nacked or expired. It leases as
many as it has free slots, the same lease as receive's (receipts, visibility timeout, `max_receive_count`
and dead letters are the store's), and waits in the subscription's line (router.signals) when none are
ready. Each ack or nack through this replica's bus frees the slot of a receipt it names, an extend moves
the slot's expiry, and a slot whose visibility timeout passes frees itself (the message is visible to
everyone again, this stream included). Acks made on another replica free a stream's slots only at their
expiry: a client acks where it streams from (the SDK does).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

from router.persistence import Message, ReceiptResult
from router.signals import Signal, wait_turn
from services.common.errors import Unavailable

if TYPE_CHECKING:
    from router.bus import Bus


def now_ms() -> int:
    return int(time.time() * 1000)


class Window:
    """The leases one stream holds: receipt -> the moment (ms) its message is visible again."""

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.held: dict[str, int] = {}
        self._expiries: list[tuple[int, str]] = []  # a heap; entries whose receipt moved on are skipped
        self.freed = asyncio.Event()

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
        if self.held.pop(receipt, None) is not None:
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


class Streams:
    """This replica's streams: their windows by receipt, and the cap on how many run at once."""

    def __init__(self, bus: Bus, max_streams: int) -> None:
        self.bus = bus
        self.max_streams = max_streams
        self.open = 0
        self._windows: dict[str, Window] = {}

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
        window = Window(prefetch)
        visibility_ms = int(visibility_timeout_s * 1000)
        try:
            sub = await bus.queue(name)
            heartbeat_at = loop.time() + heartbeat_s
            while not (bus.stopping or gone.is_set()):
                next_expiry_ms = window.expire(now_ms())
                until = heartbeat_at
                if next_expiry_ms is not None:
                    until = min(until, loop.time() + max(0.0, next_expiry_ms - now_ms()) / 1000 + 0.001)
                if window.free == 0:
                    window.freed.clear()
                    await _wait_any((window.freed, gone, bus.stopped), until - loop.time())
                else:
                    max_receive_count = sub.spec.delivery.max_receive_count
                    signal = bus.signals[name]  # looked up each time: a deleted subscription's line is forgotten
                    messages = await self._lease(name, max_receive_count, window, visibility_ms, gone, until, signal)
                    if messages:
                        heartbeat_at = loop.time() + heartbeat_s
                        yield messages
                        continue
                if loop.time() >= heartbeat_at and not (bus.stopping or gone.is_set()):
                    heartbeat_at = loop.time() + heartbeat_s
                    yield []
                sub = await bus.queue(name)  # deleted meanwhile: NotFound ends the stream
        finally:
            for receipt in window.held:
                self._windows.pop(receipt, None)
            window.held.clear()

    async def _lease(
        self,
        name: str,
        max_receive_count: int,
        window: Window,
        visibility_ms: int,
        gone: asyncio.Event,
        until: float,
        signal: Signal,
    ) -> list[Message]:
        """Lease up to the window's free slots; with none ready, wait in line until `until` (loop time)."""
        loop = asyncio.get_running_loop()
        free = window.free
        turn = signal.join()  # in line before the read: no lost wake-ups (router.signals)
        woken = False
        try:
            at = now_ms()
            messages = await self.bus.store.receive(name, free, visibility_ms, at, max_receive_count)
            if messages:
                if gone.is_set():
                    await self.bus.store.release(name, [m.receipt for m in messages], now_ms())
                    return []
                for message in messages:
                    window.hold(message.receipt, at + visibility_ms)
                    self._windows[message.receipt] = window
                if len(messages) == free:  # it may have left some behind: the next in line may take them
                    signal.ready(1)
                return messages
            if not self.bus.stopping:
                await wait_turn(turn, gone, until - loop.time())
                woken = turn.done()  # then the next round reads again: the wake-up is used
            return []
        finally:
            if not woken:
                signal.leave(turn)  # passes on a wake-up that came meanwhile


async def _wait_any(events: Sequence[asyncio.Event], timeout_s: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
