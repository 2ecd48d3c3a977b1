"""The timer that wakes waiters when a hidden message becomes visible (router.signals) loses no message.

CI saw push retries stall for good (test_push's 5xx retry and kill -9 redelivery, 20 s without the next
attempt): uvloop fired the timer up to a millisecond before the message's `visible_at`, the lease it woke
found nothing, and the look-up of the next moment, made a moment later, already counted the message as
visible and so scheduled no wake-up for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from router import signals
from router.signals import Signal, Signals


class Clock:
    """The wall clock `router.signals` reads: the given readings in turn, then the real one."""

    def __init__(self, *readings: int) -> None:
        self.readings: Iterator[int] = iter(readings)

    def __call__(self) -> int:
        return next(self.readings, int(time.time() * 1000))


async def test_a_timer_the_loop_fires_early_wakes_nobody_until_the_moment_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at_ms = int(time.time() * 1000) + 10
    # Armed 10 ms ahead; the loop fires it while the wall clock still says 20 ms before the moment (an early
    # firing, made large enough to see); armed again for the rest; then fired on time.
    monkeypatch.setattr(signals, "now_ms", Clock(at_ms - 10, at_ms - 20, at_ms - 20, at_ms + 1))
    signal = Signal()
    woken: list[str] = []
    fired = asyncio.get_running_loop().create_future()
    signal.watch(lambda: woken.append("watcher"))
    signal.wake_at(at_ms, fired.set_result)
    async with asyncio.timeout(5):
        fired_ms = await fired
    assert fired_ms == at_ms + 1  # the moment it really fired, which the next look-up starts from
    assert woken == ["watcher"]  # once, when the moment had come; the early firing woke nobody


async def test_the_next_hidden_message_is_looked_up_beyond_the_moment_the_timer_fired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at_ms = int(time.time() * 1000) + 5
    monkeypatch.setattr(signals, "now_ms", Clock(at_ms - 5, at_ms + 2))
    asked: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    async def next_visible(name: str, after_ms: int) -> int | None:
        asked.set_result((name, after_ms))
        return None

    timers = Signals(next_visible)
    timers.schedule("q", at_ms)
    async with asyncio.timeout(5):
        assert await asked == ("q", at_ms + 2)  # not the (later) time of the look-up itself
    timers.close()
