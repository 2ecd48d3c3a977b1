"""The worker pool against a fake queue: one shared receive feeds the idle workers, and a pause is a pause."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from router.client import ReceivedMessage
from services.processing.worker import JobContext, WorkerPool


def message(n: int) -> ReceivedMessage:
    return ReceivedMessage(f"r{n}", 1, n, {"data": {"video_id": f"v{n}"}})


class Changes:
    """Something the test waits on until a condition holds: woken by each change, no polling."""

    def __init__(self) -> None:
        self.condition = asyncio.Condition()

    def changed(self) -> None:
        async def notify() -> None:
            async with self.condition:
                self.condition.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def until(self, holds: Callable[[], bool], timeout_s: float = 5) -> None:
        async with asyncio.timeout(timeout_s), self.condition:
            await self.condition.wait_for(holds)


class FakeQueue:
    """Receives wait until the test answers them; cancellation can be ignored, as an answer already on its way is."""

    def __init__(self, *, ignore_cancel: bool = False) -> None:
        self.ignore_cancel = ignore_cancel
        self.asked: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.cancelled = 0
        self.changes = Changes()
        self.answers: asyncio.Queue[list[ReceivedMessage] | Exception] = asyncio.Queue()
        self.acked: list[str] = []
        self.nacked: list[tuple[str, float]] = []

    async def receive(
        self, *, max_messages: int = 1, wait_s: float = 20, visibility_timeout_s: float = 30
    ) -> list[ReceivedMessage]:
        self.asked.append(max_messages)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.changes.changed()
        answer = asyncio.ensure_future(self.answers.get())
        try:
            while True:
                try:
                    result = await asyncio.shield(answer)
                except asyncio.CancelledError:
                    self.cancelled += 1
                    if not self.ignore_cancel:
                        answer.cancel()
                        raise
                else:
                    if isinstance(result, Exception):
                        raise result
                    return result
        finally:
            self.in_flight -= 1
            self.changes.changed()

    async def ack(self, receipts: list[str]) -> list[dict[str, object]]:
        self.acked += receipts
        self.changes.changed()
        return [{"receipt": r, "ok": True} for r in receipts]

    async def nack(self, receipts: list[str], *, delay_s: float = 0) -> list[dict[str, object]]:
        self.nacked += [(r, delay_s) for r in receipts]
        self.changes.changed()
        return [{"receipt": r, "ok": True} for r in receipts]

    async def extend(self, receipts: list[str], *, visibility_timeout_s: float) -> list[dict[str, object]]:
        return [{"receipt": r, "ok": True} for r in receipts]


class FakeJobs:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.release = asyncio.Event()
        self.changes = Changes()

    async def run(self, message: ReceivedMessage, context: JobContext) -> None:
        self.ran.append(message.receipt)
        self.changes.changed()
        await self.release.wait()

    async def report_failure(
        self, message: ReceivedMessage, context: JobContext, *, permanent: bool, reason: str, input_rejected: bool
    ) -> None:
        pass


@pytest.fixture
async def jobs() -> FakeJobs:
    return FakeJobs()


async def receives(queue: FakeQueue, count: int) -> None:
    """Until the `count`th receive is waiting."""
    await queue.changes.until(lambda: len(queue.asked) == count and queue.in_flight == 1)


@pytest.fixture
async def pools() -> AsyncIterator[list[WorkerPool]]:
    made: list[WorkerPool] = []
    yield made
    for pool in made:
        pool.begin_stop(0)
        await pool.drain()


async def test_idle_workers_share_one_receive_for_up_to_ten_messages(jobs: FakeJobs, pools: list[WorkerPool]) -> None:
    queue = FakeQueue()
    pool = WorkerPool(queue, jobs, visibility_timeout_s=60)  # type: ignore[arg-type]
    pools.append(pool)
    pool.grow(25)
    await receives(queue, 1)
    assert queue.asked == [10] and queue.most_in_flight == 1

    queue.answers.put_nowait([message(1), message(2), message(3)])
    await receives(queue, 2)  # the next receive, for the idle workers left
    assert queue.asked == [10, 10] and queue.most_in_flight == 1
    await jobs.changes.until(lambda: len(jobs.ran) == 3)
    assert sorted(jobs.ran) == ["r1", "r2", "r3"] and pool.busy == 3
    jobs.release.set()
    await queue.changes.until(lambda: len(queue.acked) == 3)
    assert queue.most_in_flight == 1 and queue.nacked == []


async def test_a_receive_asks_for_no_more_than_the_idle_workers(jobs: FakeJobs, pools: list[WorkerPool]) -> None:
    queue = FakeQueue()
    pool = WorkerPool(queue, jobs, visibility_timeout_s=60)  # type: ignore[arg-type]
    pools.append(pool)
    pool.grow(3)
    await receives(queue, 1)
    assert queue.asked == [3] and queue.most_in_flight == 1


async def test_retiring_every_idle_worker_cancels_the_pending_receive(jobs: FakeJobs, pools: list[WorkerPool]) -> None:
    queue = FakeQueue()
    pool = WorkerPool(queue, jobs, visibility_timeout_s=60)  # type: ignore[arg-type]
    pools.append(pool)
    pool.grow(2)
    await receives(queue, 1)
    assert pool.shrink(2) == 2
    assert pool.running == 0
    await queue.changes.until(lambda: queue.in_flight == 0)
    assert queue.cancelled == 1 and queue.asked == [2]


async def test_a_message_received_after_the_pause_is_handed_back_not_run(
    jobs: FakeJobs, pools: list[WorkerPool]
) -> None:
    # The router's answer was on its way as the pause came: the receive returns a message anyway.
    queue = FakeQueue(ignore_cancel=True)
    pool = WorkerPool(queue, jobs, visibility_timeout_s=60, retry_delay_s=10)  # type: ignore[arg-type]
    pools.append(pool)
    pool.grow(1)
    await receives(queue, 1)
    assert pool.shrink(1) == 1
    queue.answers.put_nowait([message(1)])
    await queue.changes.until(lambda: bool(queue.nacked))
    assert queue.nacked == [("r1", 0)] and jobs.ran == [] and pool.handed_back == 1
    assert queue.cancelled >= 1


async def test_stopping_hands_a_running_job_back_at_once(jobs: FakeJobs, pools: list[WorkerPool]) -> None:
    queue = FakeQueue()
    pool = WorkerPool(queue, jobs, visibility_timeout_s=60)  # type: ignore[arg-type]
    pool.grow(2)
    await receives(queue, 1)
    queue.answers.put_nowait([message(1)])
    await jobs.changes.until(lambda: bool(jobs.ran))
    pool.begin_stop(0)
    await pool.drain()
    assert queue.nacked == [("r1", 0)] and queue.acked == []
    assert pool.workers == set() and queue.in_flight == 0


async def test_the_receive_loop_outlives_a_failed_receive(jobs: FakeJobs, pools: list[WorkerPool]) -> None:
    queue = FakeQueue()
    pool = WorkerPool(queue, jobs, visibility_timeout_s=60)  # type: ignore[arg-type]
    pools.append(pool)
    pool.grow(1)
    await receives(queue, 1)
    queue.answers.put_nowait(KeyError("messages"))  # an answer that makes no sense
    await receives(queue, 2)  # after a short backoff, it asks again
    queue.answers.put_nowait([message(1)])
    await jobs.changes.until(lambda: jobs.ran == ["r1"])
