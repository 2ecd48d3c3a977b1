"""Wake-ups for long polls on this replica: one `Signal` per subscription, set off by the notifier
(router.notifier) for every commit that touches it, whichever replica made it.

Nothing here polls. Two kinds of waiter, woken differently:

- stats long polls and push dispatchers want every change: they capture the current `changed` event
  (or `watch`) *before* they read the store, so a commit between the read and the wait still wakes them;
- receivers (receive long polls, streams) want messages, and a lease query that finds none is wasted
  work: they queue in line (FIFO) with `join()` before they read, and a commit that makes messages
  ready wakes only the first in line. The notifier says *that* a subscription got ready messages, not
  how many, so the chain carries on from there: a receiver that got a full batch (it may have left some
  behind) wakes the next, and so does one woken while it was reading (the wake may be for messages its
  read did not see) or leaving without reading. A re-check, a deletion, shutdown and a hidden message
  becoming visible wake every receiver in line. A woken receiver that finds nothing joins the line again.

Messages hidden by a visibility timeout or a nack delay become visible without any commit, so each signal
also keeps one timer for the earliest such moment. Two rules keep that timer from losing a message:

- it wakes nobody before the wall clock (which the store's `visible_at` is written in) reaches the moment: uvloop
  fires timers up to about a millisecond early (libuv truncates its clock to whole milliseconds), and a lease
  made then would miss the message by that millisecond; an early firing sets the timer again for the rest;
- the next moment is looked up among the messages hidden beyond the moment the timer fired, not beyond the
  time of the look-up: the leases it wakes see every message visible by then, and a message that became
  visible after it (after the woken lease, before the look-up, which runs later under load) gets a wake-up of
  its own instead of none.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from router.persistence import now_ms
from services.common.errors import Unavailable


class Signal:
    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self._watchers: list[Callable[[], None]] = []
        self._line: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at_ms: int | None = None

    def bump(self) -> None:
        """Something changed: wake the stats long polls and the watchers (not the receivers: see `ready`)."""
        self.changed.set()
        self.changed = asyncio.Event()
        for watcher in self._watchers:
            watcher()

    # -- receivers --------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Receivers in line."""
        return len(self._line)

    def join(self) -> asyncio.Future[None]:
        """Take a place in line *before* reading the store; the future is done once this receiver is woken."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        return turn

    def leave(self, turn: asyncio.Future[None]) -> None:
        """Step out of line without waiting for the turn (done reading, timed out, client gone). A wake-up
        that came meanwhile may have been meant for messages this receiver will not take: pass it on."""
        if turn.done():
            if not turn.cancelled():
                self.ready(1)
            return
        turn.cancel()
        self._line.remove(turn)

    def ready(self, count: int = 1) -> None:
        """Messages became ready: wake the first `count` receivers in line."""
        while count > 0 and self._line:
            self._line.popleft().set_result(None)
            count -= 1

    def wake_receivers(self) -> None:
        self.ready(len(self._line))

    def wake_everyone(self) -> None:
        self.bump()
        self.wake_receivers()

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` on every bump (a long-lived waiter, such as a push dispatcher, uses this
        rather than a new wait on `changed` each time)."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def wake_at(self, at_ms: int, on_fire: Callable[[int], None]) -> None:
        """Fire once the wall clock reaches `at_ms` (ms), unless an earlier wake-up is already set; `on_fire` gets
        the wall clock's ms when it fired."""
        if self._timer_at_ms is not None and self._timer_at_ms <= at_ms:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at_ms = at_ms
        self._arm(at_ms, on_fire)

    def _arm(self, at_ms: int, on_fire: Callable[[int], None]) -> None:
        delay_s = max(0, at_ms - now_ms()) / 1000 + 0.001
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._fire, at_ms, on_fire)

    def _fire(self, at_ms: int, on_fire: Callable[[int], None]) -> None:
        now = now_ms()
        if now < at_ms:  # fired early (see the module's docstring): a lease now would not see the message
            self._arm(at_ms, on_fire)
            return
        self._timer = self._timer_at_ms = None
        self.wake_everyone()
        on_fire(now)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at_ms = None
        self.wake_everyone()  # anyone still waiting on a deleted subscription


async def wait_for(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; True if it was set."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def wait_turn(turn: asyncio.Future[None], gone: asyncio.Event, timeout_s: float) -> None:
    """Wait until a receiver's `turn` comes or `gone` is set, at most `timeout_s` (the turn is left as it is:
    the receiver leaves the line itself, passing on a wake-up that came too late for it)."""
    if turn.done() or gone.is_set():
        return
    gone_waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait((turn, gone_waiter), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_waiter.cancel()


class Signals:
    """The signals of every subscription; `on_change` is fed from the notifier."""

    def __init__(
        self,
        next_visible: Callable[[str, int], Awaitable[int | None]],
        on_timer: Callable[[str], None] = lambda name: None,
    ) -> None:
        """`next_visible(name, after_ms)`: when the earliest message of `name` hidden beyond `after_ms` becomes
        visible (None if none is); `on_timer(name)`: a hidden message's time came."""
        self._signals: dict[str, Signal] = {}
        self._next_visible = next_visible
        self._on_timer = on_timer
        self._tasks: set[asyncio.Task[None]] = set()

    def __getitem__(self, name: str) -> Signal:
        signal = self._signals.get(name)
        if signal is None:
            signal = self._signals[name] = Signal()
        return signal

    def on_change(self, touched: frozenset[str], ready: frozenset[str], hidden_until: dict[str, int]) -> None:
        for name in touched:
            self[name].bump()
        for name in ready:
            self[name].ready(1)
        for name, at_ms in hidden_until.items():
            self.schedule(name, at_ms)

    def schedule(self, name: str, at_ms: int) -> None:
        self[name].wake_at(at_ms, lambda fired_ms: self._reschedule(name, fired_ms))

    def forget(self, name: str) -> None:
        signal = self._signals.pop(name, None)
        if signal is not None:
            signal.cancel()

    def _reschedule(self, name: str, fired_ms: int) -> None:
        # After a timer fires, look up the next hidden message of that subscription and wait for it.
        self._on_timer(name)
        task = asyncio.get_running_loop().create_task(self._schedule_next(name, fired_ms))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _schedule_next(self, name: str, fired_ms: int) -> None:
        try:
            # Beyond the moment the timer fired, not beyond now (see the module's docstring).
            at_ms = await self._next_visible(name, fired_ms) if name in self._signals else None
        except Unavailable:  # the store's database is away; its re-checks wake waiters meanwhile
            return
        if at_ms is not None:
            self.schedule(name, at_ms)

    def wake_all(self) -> None:
        for signal in self._signals.values():
            signal.wake_everyone()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for signal in self._signals.values():
            signal.cancel()
