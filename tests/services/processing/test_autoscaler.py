"""The autoscaler's decisions, against a fake fleet and a fake stats source (no router, no workers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.client import QueueStats
from services.common.errors import InvalidInput
from services.processing.autoscaler import Autoscaler, Limits, ScalingChange, desired_size
from services.processing.capacity import fleet_cap


class FakeFleet:
    """Workers as counts: `busy` of them have a job, the rest are idle."""

    def __init__(self) -> None:
        self.size = 0
        self.busy = 0

    @property
    def running(self) -> int:
        return self.size

    def grow(self, count: int) -> None:
        self.size += count

    def shrink(self, count: int) -> int:
        retired = min(count, self.size - self.busy)
        self.size -= retired
        return retired


class FakeStats:
    """A stats source the test feeds by hand: each `put` is one answer of the long poll."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[QueueStats] = asyncio.Queue()
        self.version = 0

    def put(self, backlog: int, in_flight: int = 0) -> None:
        self.version += 1
        self.queue.put_nowait(QueueStats(backlog, in_flight, 0, 0, 0.0, self.version, 0, 0))

    async def watch(self) -> AsyncIterator[QueueStats]:
        while True:
            yield await self.queue.get()
            self.queue.task_done()  # the consumer asked for the next one: it has acted on this one


class Harness:
    def __init__(self, limits: Limits, cooldown_s: float = 0.2, history_size: int = 100) -> None:
        self.fleet = FakeFleet()
        self.stats = FakeStats()
        self.changes: asyncio.Queue[ScalingChange] = asyncio.Queue()
        self.autoscaler = Autoscaler(
            self.fleet,
            limits,
            cooldown_s=cooldown_s,
            stats=self.stats.watch,
            on_change=self.changes.put_nowait,
            history_size=history_size,
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.autoscaler.run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.autoscaler.stop()
        assert self.task is not None
        await asyncio.gather(self.task, return_exceptions=True)

    async def settle(self) -> None:
        """Let the autoscaler read everything fed so far."""
        if not self.stats.queue.empty():
            await self.stats.queue.join()

    async def next_change(self, timeout_s: float = 2) -> tuple[int, int]:
        change = await asyncio.wait_for(self.changes.get(), timeout_s)
        return change.from_, change.to


@pytest.mark.parametrize(
    ("backlog", "busy", "limits", "desired"),
    [
        (0, 0, Limits(0, 4, 1), 0),
        (1, 0, Limits(0, 4, 1), 1),
        (3, 2, Limits(0, 4, 1), 4),  # capped at max
        (0, 2, Limits(0, 4, 1), 2),  # busy workers keep themselves
        (5, 0, Limits(0, 10, 2), 3),  # ceil(5 / 2)
        (0, 0, Limits(2, 4, 1), 2),  # never under min
        (10_000, 0, Limits(0, 1337, 1), 1337),
        (-1, 0, Limits(0, 4, 1), 0),
    ],
)
def test_desired_size(backlog: int, busy: int, limits: Limits, desired: int) -> None:
    assert desired_size(backlog, busy, limits) == desired


async def test_jobs_running_on_other_instances_ask_for_no_workers_here() -> None:
    async with Harness(Limits(1, 4, 1), cooldown_s=60) as h:
        assert await h.next_change() == (0, 1)  # min_workers
        # Another instance holds 3 jobs and nothing waits: this one has nothing to do for them.
        h.stats.put(backlog=0, in_flight=3)
        await h.settle()
        assert (h.autoscaler.desired, h.fleet.running) == (1, 1)
        # Its share: the 2 waiting jobs plus its own running one (not the other instance's 3).
        h.fleet.busy = 1
        h.stats.put(backlog=2, in_flight=6)
        assert await h.next_change() == (1, 3)
        change = h.autoscaler.history[-1]
        assert (change.backlog, change.in_flight, change.busy) == (2, 6, 1)
        assert change.reason.startswith("2 waiting + 1 running here")


async def test_scales_out_at_once_and_in_after_the_cooldown() -> None:
    async with Harness(Limits(0, 4, 1), cooldown_s=0.2) as h:
        h.stats.put(backlog=3)
        assert await h.next_change() == (0, 3)
        assert h.fleet.running == 3

        h.stats.put(backlog=0, in_flight=0)
        await h.settle()
        assert h.fleet.running == 3  # not before the cooldown
        started = asyncio.get_running_loop().time()
        assert await h.next_change() == (3, 0)
        assert asyncio.get_running_loop().time() - started >= 0.15
        assert [(c.from_, c.to) for c in h.autoscaler.history] == [(0, 3), (3, 0)]
        assert "needed 0 for 0.2 s" in h.autoscaler.history[-1].reason


async def test_demand_that_returns_within_the_cooldown_cancels_the_scale_in() -> None:
    async with Harness(Limits(0, 4, 1), cooldown_s=0.3) as h:
        h.stats.put(backlog=2)
        assert await h.next_change() == (0, 2)
        h.stats.put(backlog=0)
        await h.settle()
        h.fleet.busy = 1
        h.stats.put(backlog=1, in_flight=1)
        with pytest.raises(TimeoutError):
            await h.next_change(timeout_s=0.5)
        assert h.fleet.running == 2


async def test_busy_workers_are_never_reaped() -> None:
    async with Harness(Limits(0, 4, 2), cooldown_s=0.05) as h:
        h.stats.put(backlog=4)
        assert await h.next_change() == (0, 2)
        h.fleet.busy = 2
        # The queue wants one worker (2 in flight at 2 per worker) but both are busy: nobody is reaped.
        h.stats.put(backlog=0, in_flight=2)
        with pytest.raises(TimeoutError):
            await h.next_change(timeout_s=0.3)
        assert h.fleet.running == 2
        # One finishes and goes idle: the pool tells the autoscaler, which reaps it (the cooldown has passed).
        h.fleet.busy = 1
        h.autoscaler.reconcile()
        assert await h.next_change() == (2, 1)


async def test_a_busy_worker_keeps_itself_through_in_flight() -> None:
    async with Harness(Limits(0, 4, 1), cooldown_s=0.05) as h:
        h.stats.put(backlog=1)
        assert await h.next_change() == (0, 1)
        h.fleet.busy = 1
        h.stats.put(backlog=0, in_flight=1)  # the worker took the message
        with pytest.raises(TimeoutError):
            await h.next_change(timeout_s=0.2)
        h.fleet.busy = 0
        h.stats.put(backlog=0, in_flight=0)  # ... and acked it
        assert await h.next_change() == (1, 0)


async def test_without_new_numbers_the_size_stays() -> None:
    """The router unreachable: `watch_stats` retries and yields nothing, so nothing is decided."""
    async with Harness(Limits(0, 4, 1), cooldown_s=0.05) as h:
        h.stats.put(backlog=2)
        assert await h.next_change() == (0, 2)
        with pytest.raises(TimeoutError):
            await h.next_change(timeout_s=0.3)
        assert h.fleet.running == 2


async def test_min_workers_apply_at_start_and_limits_change_at_run_time() -> None:
    async with Harness(Limits(1, 4, 1), cooldown_s=60) as h:
        assert await h.next_change() == (0, 1)
        assert "min_workers is 1" in h.autoscaler.history[-1].reason

        h.autoscaler.set_limits(min_workers=3)
        assert await h.next_change() == (1, 3)
        assert h.autoscaler.history[-1].reason == "min_workers set to 3"

        # Lowering max below the running count is a limit, not a forecast: no cooldown.
        h.autoscaler.set_limits(min_workers=0, max_workers=1)
        assert await h.next_change() == (3, 1)

        with pytest.raises(InvalidInput) as refused:
            h.autoscaler.set_limits(min_workers=5)
        assert refused.value.field == "min_workers" and "max_workers (1)" in refused.value.expected
        with pytest.raises(InvalidInput) as refused:
            h.autoscaler.set_limits(target_backlog_per_worker=0)
        assert refused.value.field == "target_backlog_per_worker"
        assert h.autoscaler.limits == Limits(0, 1, 1)


async def test_history_is_bounded() -> None:
    async with Harness(Limits(0, 100, 1), cooldown_s=0, history_size=3) as h:
        for backlog in (1, 2, 3, 4, 5):
            h.stats.put(backlog=backlog)
            await h.next_change()
        assert [(c.from_, c.to) for c in h.autoscaler.history] == [(2, 3), (3, 4), (4, 5)]


def test_the_open_file_limit_caps_the_fleet() -> None:
    assert fleet_cap(1024).workers == 96  # (1024 - 256) // 8
    assert fleet_cap(65_536).workers == 8_160
    assert fleet_cap(200).workers == 0
    assert "1024" in fleet_cap(1024).reason


async def test_desired_never_passes_the_cap() -> None:
    autoscaler = Autoscaler(FakeFleet(), Limits(5, 1337, 1), cooldown_s=0, stats=FakeStats().watch, cap=3)
    autoscaler.observe(backlog=100, in_flight=0)
    assert autoscaler.desired == 3 and autoscaler.fleet.running == 3
    assert autoscaler.effective_limits == Limits(3, 3, 1)
    assert "open-file limit" in autoscaler.history[-1].reason
