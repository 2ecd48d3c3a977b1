"""The worker pool: asyncio tasks that take jobs off a queue one at a time and own their ack or nack.

    pool = WorkerPool(router.queue("transcode"), jobs, visibility_timeout_s=60)
    pool.grow(2)      # the autoscaler decides how many
    ...
    pool.begin_stop(grace_s=30)
    await pool.drain()

A worker long-polls for one message (while it waits it is *idle*), runs the job in a task of its
own (then it is *busy*), extends the message's visibility every third of the timeout while the
job runs, and settles the message from the job's verdict, as arq's `Retry` does:

    the job returns          ack
    PermanentFailure(reason) `failed` event (permanent), then ack
    RetryLater(reason, delay) `failed` event (not permanent), then nack with the delay
    JobCancelled / the job task cancelled (the video was deleted)   ack, no event
    any other exception      treated as RetryLater (a bug or an outage, not the video's fault)

After `max_receive_count` receives the router dead-letters a message that keeps failing.

Retiring an idle worker (scale-in) does not cut its long poll: a receive cancelled on our side
would still be answered by the router, and the message it leased would sit invisible until its
visibility timeout ran out (with one more receive counted against it). The worker finishes its
poll and leaves; if the poll brings a job it does that job first. Shutdown is the exception: idle
workers are cancelled at once, so that stopping does not wait out a 20 s poll (a message the
router leases to such an abandoned poll comes back after its visibility timeout); busy ones get
`grace_s` to finish, then their job is cancelled (which kills its ffmpeg) and the message nacked
with no delay so another worker takes it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from router.client import QueueConsumer, ReceivedMessage, RouterError, full_jitter

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 10.0
RECEIVE_BACKOFF_MAX_S = 10.0


class RetryLater(Exception):
    """The job did not finish for a reason that may pass: run it again after `delay_s` (None: the pool's default)."""

    def __init__(self, reason: str, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class PermanentFailure(Exception):
    """The job can never succeed as asked (the input is at fault): report it and drop the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobCancelled(Exception):
    """Nobody wants the job any more (its video was deleted): drop the message quietly."""


@dataclass(frozen=True)
class JobContext:
    worker: str
    threads: int


class JobHandler(Protocol):
    async def run(self, message: ReceivedMessage, context: JobContext) -> None:
        """Do the job; raise a verdict (`RetryLater`, `PermanentFailure`, `JobCancelled`) if it did not succeed."""
        ...

    async def report_failure(
        self, message: ReceivedMessage, context: JobContext, *, permanent: bool, reason: str
    ) -> None:
        """Announce a failed attempt (the `cattube.transcode.failed` event)."""
        ...


def video_id_of(message: ReceivedMessage) -> str | None:
    data = message.data
    video_id = data.get("video_id") if isinstance(data, dict) else None
    return video_id if isinstance(video_id, str) else None


class Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self.busy = False
        self.retiring = False
        self.video_id: str | None = None
        self.job: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "busy" if self.busy else "idle"
        return f"Worker({self.name!r}, {state}{', retiring' if self.retiring else ''})"


class WorkerPool:
    def __init__(
        self,
        queue: QueueConsumer,
        handler: JobHandler,
        *,
        visibility_timeout_s: float,
        receive_wait_s: float = 20,
        retry_delay_s: float = 10,
        threads: Callable[[int], int] = lambda running: 1,
        name_prefix: str = "worker",
        on_idle: Callable[[], None] | None = None,
        on_outcome: Callable[[str, float], None] | None = None,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.visibility_timeout_s = visibility_timeout_s
        self.receive_wait_s = receive_wait_s
        self.retry_delay_s = retry_delay_s
        self.workers: set[Worker] = set()
        self.on_idle = on_idle
        self.on_outcome = on_outcome
        self._threads = threads
        self._names = (f"{name_prefix}-{n}" for n in itertools.count(1))
        self._stopping = asyncio.Event()
        self._deadline: float | None = None

    # -- what the autoscaler sees -----------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if not w.retiring)

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers if w.busy and not w.retiring)

    @property
    def retiring(self) -> int:
        return sum(1 for w in self.workers if w.retiring)

    def grow(self, count: int) -> None:
        if self._stopping.is_set():
            return
        # Retired workers still in their last long poll (busy ones first) come back before new ones start.
        for worker in sorted((w for w in self.workers if w.retiring), key=lambda w: not w.busy)[:count]:
            worker.retiring = False
            count -= 1
        for _ in range(count):
            worker = Worker(next(self._names))
            worker.task = asyncio.get_running_loop().create_task(self._run(worker), name=worker.name)
            self.workers.add(worker)

    def shrink(self, count: int) -> int:
        idle = [w for w in self.workers if not w.busy and not w.retiring][:count]
        for worker in idle:
            worker.retiring = True
        return len(idle)

    # -- deletion and shutdown --------------------------------------------------------------------

    async def cancel_video(self, video_id: str) -> int:
        """Cancel every running job for `video_id` (killing its ffmpeg) and wait until they have stopped."""
        jobs = [w.job for w in self.workers if w.busy and w.video_id == video_id and w.job is not None]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        return len(jobs)

    def begin_stop(self, grace_s: float) -> None:
        """Take no more jobs; cancel idle workers now; busy ones have `grace_s` to finish (see `drain`)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._deadline = time.monotonic() + grace_s
        for worker in self.workers:
            if not worker.busy and worker.task is not None:
                worker.task.cancel()

    async def drain(self) -> None:
        """Wait for busy workers until the grace period ends, then cancel them (their messages are nacked)."""
        if self._deadline is None:
            self.begin_stop(0)
        assert self._deadline is not None
        tasks = [w.task for w in self.workers if w.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, self._deadline - time.monotonic()))
        if pending:
            log.warning("grace period over: stopping %d running job(s); they go back to the queue", len(pending))
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one worker -------------------------------------------------------------------------------

    async def _run(self, worker: Worker) -> None:
        failures = 0
        try:
            while not self._stopping.is_set() and not worker.retiring:
                try:
                    messages = await self.queue.receive(
                        max_messages=1, wait_s=self.receive_wait_s, visibility_timeout_s=self.visibility_timeout_s
                    )
                except RouterError as exc:
                    failures += 1
                    delay = full_jitter(failures, 0.2, RECEIVE_BACKOFF_MAX_S)
                    log.warning("%s cannot receive (%s); trying again in %.1f s", worker.name, exc, delay)
                    await self._sleep_unless_stopping(delay)
                    continue
                failures = 0
                for message in messages:
                    await self._process(worker, message)
        finally:
            self.workers.discard(worker)

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def _process(self, worker: Worker, message: ReceivedMessage) -> None:
        # No await between the receive returning and `busy`: shutdown must never take this worker for idle.
        worker.busy = True
        worker.video_id = video_id_of(message)
        # Every live worker may run an ffmpeg (a retired one finishing its last poll too): share the CPUs among them.
        context = JobContext(worker.name, self._threads(max(1, len(self.workers))))
        started = time.monotonic()
        job = worker.job = asyncio.get_running_loop().create_task(self.handler.run(message, context))
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(message))
        try:
            try:
                await asyncio.wait({job})
            except asyncio.CancelledError:
                # Shutdown past the grace period: stop the job (its ffmpeg dies with it) and hand the
                # message back at once, so another worker can take it.
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)
                await self._settle("nack", message, delay_s=0)
                self._outcome("interrupted", started)
                raise
            await self._verdict(worker, message, context, job, started)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            worker.busy = False
            worker.video_id = None
            worker.job = None
            if self.on_idle is not None and not self._stopping.is_set():
                self.on_idle()

    async def _verdict(
        self, worker: Worker, message: ReceivedMessage, context: JobContext, job: asyncio.Task[None], started: float
    ) -> None:
        exc = None if job.cancelled() else job.exception()
        if job.cancelled() or isinstance(exc, JobCancelled):
            log.info("%s: job for video %s cancelled (deleted); dropping it", worker.name, worker.video_id)
            await self._settle("ack", message)
            self._outcome("cancelled", started)
        elif exc is None:
            await self._settle("ack", message)
            self._outcome("completed", started)
        elif isinstance(exc, PermanentFailure):
            log.warning("%s: video %s failed for good: %s", worker.name, worker.video_id, exc.reason)
            if await self._report(message, context, permanent=True, reason=exc.reason):
                await self._settle("ack", message)
            else:  # the store must hear of it: keep the message, try again later
                await self._settle("nack", message, delay_s=self.retry_delay_s)
            self._outcome("failed", started)
        else:
            if isinstance(exc, RetryLater):
                reason, delay_s = exc.reason, exc.delay_s
            else:
                log.error("%s: job for video %s raised", worker.name, worker.video_id, exc_info=exc)
                reason, delay_s = (
                    f"An internal error stopped the transcode ({type(exc).__name__}); it will be retried.",
                    None,
                )
            delay_s = self.retry_delay_s if delay_s is None else delay_s
            log.warning("%s: video %s will be retried in %g s: %s", worker.name, worker.video_id, delay_s, reason)
            await self._report(message, context, permanent=False, reason=reason)
            await self._settle("nack", message, delay_s=delay_s)
            self._outcome("retried", started)

    async def _report(self, message: ReceivedMessage, context: JobContext, *, permanent: bool, reason: str) -> bool:
        try:
            await self.handler.report_failure(message, context, permanent=permanent, reason=reason)
        except Exception:
            log.exception("could not announce the failure of video %s", video_id_of(message))
            return False
        return True

    async def _settle(self, verb: str, message: ReceivedMessage, *, delay_s: float = 0) -> None:
        """Ack or nack, bounded in time; if it fails the visibility timeout brings the message back anyway."""
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                if verb == "ack":
                    results = await self.queue.ack([message.receipt])
                else:
                    results = await self.queue.nack([message.receipt], delay_s=delay_s)
        except (RouterError, TimeoutError) as exc:
            log.warning(
                "%s of video %s failed (%s); it comes back after its visibility timeout",
                verb,
                video_id_of(message),
                exc,
            )
            return
        for result in results:
            if not result.get("ok"):
                log.warning("%s of video %s refused: %s", verb, video_id_of(message), result.get("error"))

    async def _heartbeat(self, message: ReceivedMessage) -> None:
        """Keep the message hidden while the job runs: extend its visibility every third of the timeout."""
        period = self.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                results = await self.queue.extend([message.receipt], visibility_timeout_s=self.visibility_timeout_s)
            except RouterError as exc:
                log.warning("extending video %s failed: %s", video_id_of(message), exc)
                continue
            if results and not results[0].get("ok"):
                log.warning("video %s: the lease was lost (%s)", video_id_of(message), results[0].get("error"))

    def _outcome(self, outcome: str, started: float) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome, time.monotonic() - started)
