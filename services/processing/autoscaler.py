"""The autoscaler: an Auto Scaling group of asyncio workers that follows the `transcode` queue.

    autoscaler = Autoscaler(pool, Limits(0, 8, 1), cooldown_s=15, stats=lambda: router.watch_stats("transcode"))
    supervisor.start("autoscaler", autoscaler.run())

It reads the queue's numbers through the router's long-polling stats (`watch_stats` answers as
soon as they change), so it reacts within moments and does nothing at all while nothing
changes. Each change of the numbers, of the limits, or of a worker going idle re-decides:

    desired = clamp(ceil((backlog + busy) / target_backlog_per_worker), min_workers, max_workers)

`backlog` is the queue's (jobs waiting for any instance); `busy` is this instance's own running
jobs, so a busy worker keeps its own place. Not the queue's `in_flight`: that also counts jobs
running on other instances, and sizing on it would make every instance keep idle workers for
jobs that run elsewhere. With this share of the demand, N instances on one queue together
follow the backlog (each may reach for all of it; whoever receives first runs it). Scale-out is
immediate. Scale-in waits until the queue has asked for fewer workers for `cooldown_s` without
a break (a timer, not a poll), then retires idle workers only: a busy one finishes its job and
goes when it is idle, if the queue still does not need it. Lowering `max_workers` below the
running count takes effect without the cooldown (it is a limit, not a forecast).

When the router cannot be reached the stats stop coming (the client retries with backoff), and
nothing is decided on numbers nobody has seen: the group keeps its size.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from router.client import QueueStats
from services.common.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    min_workers: int
    max_workers: int
    target_backlog_per_worker: int

    def checked(self) -> Limits:
        """These limits, or `InvalidInput` naming the field that is out of range."""
        if self.min_workers < 0:
            raise InvalidInput("min_workers", "0 or more")
        if self.max_workers < 0:
            raise InvalidInput(
                "max_workers", "0 or more (0 pauses processing, as an Auto Scaling group's max of 0 does)"
            )
        if self.target_backlog_per_worker < 1:
            raise InvalidInput("target_backlog_per_worker", "1 or more")
        if self.min_workers > self.max_workers:
            raise InvalidInput("min_workers", f"at most max_workers ({self.max_workers})")
        return self


def desired_size(backlog: int, busy: int, limits: Limits) -> int:
    """How many workers this instance's share of the queue asks for (waiting jobs + its own running ones)."""
    wanted = math.ceil(max(0, backlog + busy) / limits.target_backlog_per_worker)
    return max(limits.min_workers, min(limits.max_workers, wanted))


@dataclass(frozen=True)
class ScalingChange:
    at: float
    """Wall-clock time (epoch seconds)."""
    from_: int
    to: int
    backlog: int
    in_flight: int
    """Queue-wide, every instance's jobs: reported, not sized on."""
    busy: int
    """This instance's running jobs."""
    reason: str


class Fleet(Protocol):
    """The workers as the autoscaler sees them (`services.processing.worker.WorkerPool`)."""

    @property
    def running(self) -> int:
        """Workers in the group (busy or idle), not counting retired ones finishing their last long poll."""
        ...

    @property
    def busy(self) -> int: ...

    def grow(self, count: int) -> None:
        """Add `count` workers now."""
        ...

    def shrink(self, count: int) -> int:
        """Retire up to `count` idle workers; returns how many were retired."""
        ...


StatsSource = Callable[[], AsyncIterator[QueueStats]]


class Autoscaler:
    def __init__(
        self,
        fleet: Fleet,
        limits: Limits,
        *,
        cooldown_s: float,
        stats: StatsSource,
        on_change: Callable[[ScalingChange], None] | None = None,
        history_size: int = 100,
        clock: Callable[[], float] = time.time,
        cap: int | None = None,
    ) -> None:
        self.fleet = fleet
        self.limits = limits.checked()
        self.cap = cap
        """The most workers this process can run (`services.processing.capacity`), whatever max_workers says."""
        self.cooldown_s = cooldown_s
        self.backlog = 0
        self.in_flight = 0
        self.desired = limits.min_workers
        self.history: deque[ScalingChange] = deque(maxlen=history_size)
        self.stats_seen = 0
        self._stats = stats
        self._on_change = on_change
        self._clock = clock
        self._below_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def run(self) -> None:
        """Apply `min_workers` at once, then follow the queue until `stop()`."""
        self._task = asyncio.current_task()
        if self._stopped:
            return
        self.reconcile()
        try:
            async for stats in self._stats():
                self.observe(stats.backlog, stats.in_flight)
        finally:
            self._cancel_timer()

    def stop(self) -> None:
        """Stop deciding (the run task is in a long poll: cancel it)."""
        self._stopped = True
        self._cancel_timer()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    @property
    def effective_limits(self) -> Limits:
        """The limits as applied: min_workers and max_workers no higher than the cap."""
        if self.cap is None:
            return self.limits
        return replace(
            self.limits,
            min_workers=min(self.limits.min_workers, self.cap),
            max_workers=min(self.limits.max_workers, self.cap),
        )

    def observe(self, backlog: int, in_flight: int) -> None:
        """New numbers from the queue."""
        self.backlog, self.in_flight = backlog, in_flight
        self.stats_seen += 1
        self.reconcile()

    def set_limits(
        self,
        *,
        min_workers: int | None = None,
        max_workers: int | None = None,
        target_backlog_per_worker: int | None = None,
    ) -> Limits:
        """Change the limits at run time (validated as a whole) and act on them at once."""
        changes = {
            name: value
            for name, value in (
                ("min_workers", min_workers),
                ("max_workers", max_workers),
                ("target_backlog_per_worker", target_backlog_per_worker),
            )
            if value is not None
        }
        limits = replace(self.limits, **changes).checked()
        if limits != self.limits:
            log.info("autoscaler limits changed: %s", limits)
            self.limits = limits
            self.reconcile(because=", ".join(f"{k} set to {v}" for k, v in changes.items()))
        return limits

    def reconcile(self, because: str | None = None) -> None:
        """Decide again from the last numbers; also called when a worker becomes idle."""
        if self._stopped:
            return
        limits = self.effective_limits
        busy = self.fleet.busy
        desired = self.desired = desired_size(self.backlog, busy, limits)
        running = self.fleet.running
        numbers = f"{self.backlog} waiting + {busy} running here"
        if desired > running:
            self._reset_cooldown()
            self.fleet.grow(desired - running)
            reason = because or f"{numbers} at {limits.target_backlog_per_worker} per worker"
            if desired == limits.min_workers and desired > self._asked():
                reason = because or f"min_workers is {limits.min_workers}"
            elif desired == limits.max_workers < self._asked() and limits.max_workers < self.limits.max_workers:
                reason = f"{reason}; capped at {desired} by this process's open-file limit"
            self._record(running, desired, reason)
            return
        if desired == running:
            self._reset_cooldown()
            return
        if running > limits.max_workers:
            self._scale_in(running, limits.max_workers, because or f"max_workers is {limits.max_workers}")
            if self.fleet.running <= desired:
                self._reset_cooldown()
                return
            running = self.fleet.running
        now = time.monotonic()
        if self._below_since is None:
            self._below_since = now
        remaining = self._below_since + self.cooldown_s - now
        if remaining > 0:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(remaining, self._cooldown_over)
            return
        self._scale_in(running, desired, f"{numbers} needed {desired} for {self.cooldown_s:g} s")

    def _asked(self) -> int:
        return math.ceil(max(0, self.backlog + self.fleet.busy) / self.limits.target_backlog_per_worker)

    def _scale_in(self, running: int, target: int, reason: str) -> None:
        retired = self.fleet.shrink(running - target)
        if retired:
            self._record(running, running - retired, reason)

    def _cooldown_over(self) -> None:
        self._timer = None
        self.reconcile()

    def _reset_cooldown(self) -> None:
        self._below_since = None
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _record(self, before: int, after: int, reason: str) -> None:
        change = ScalingChange(self._clock(), before, after, self.backlog, self.in_flight, self.fleet.busy, reason)
        self.history.append(change)
        log.info("scaled %d -> %d workers: %s", before, after, reason)
        if self._on_change is not None:
            try:
                self._on_change(change)
            except Exception:
                log.exception("announcing a scaling change failed")
