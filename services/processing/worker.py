"""The worker pool: asyncio tasks that run one job at a time, fed by one receive loop, and own their ack or nack.

    pool = WorkerPool(router.queue("transcode"), jobs, visibility_timeout_s=60)
    pool.grow(2)      # the autoscaler decides how many
    ...
    pool.begin_stop(grace_s=0)
    await pool.drain()

Idle workers hold no connection of their own: they wait on a future, and ONE receive loop per
pool long-polls the router for up to min(10, idle workers) messages and hands each to an idle
worker. A fleet of 1,337 workers therefore costs the router one long poll, not 1,337 connections
(each an open file on both sides). A worker with a message is *busy*: it runs the job in a task
of its own, extends the message's visibility every third of the timeout while the job runs, and
settles the message from the job's verdict, as arq's `Retry` does:

    the job returns          ack
    PermanentFailure(reason) `failed` event (permanent; `input_rejected` if the master is at fault), then ack
    RetryLater(reason, delay) `failed` event (not permanent), then nack with the delay
    JobCancelled / the job task cancelled (the video was deleted)   ack, no event
    any other exception      treated as RetryLater (a bug or an outage, not the video's fault)

After `max_receive_count` receives the router dead-letters a message that keeps failing.

Retiring idle workers (scale-in, `max_workers: 0`) takes effect at once: they leave without a
poll to finish, and when no idle worker is left the pending receive is cancelled (the router
releases whatever it leased to a receive whose client hung up). A receive that still brings
messages nobody idle is left to run (the pause came as the answer was on its way) hands them
back at once: nack with no delay, no job started. Shutdown retires idle workers the same way;
busy ones get `grace_s` to finish (0 by default: hand the job back now), then their job is
cancelled (which kills its ffmpeg group and removes its partial outputs) and the message nacked
with no delay so another worker or the next start takes it at once. A nack that fails is logged
as such: the message comes back after its visibility timeout anyway.
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
from services.common import contract

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 10.0
# At shutdown a hand-back gets one short try: a router that is gone must not hold the exit up.
HANDBACK_TIMEOUT_S = 2.0
RECEIVE_BACKOFF_MAX_S = 10.0
# SQS's own ceiling on one receive; also bounds the messages a pause may have to hand back.
RECEIVE_BATCH_MAX = 10


class RetryLater(Exception):
    """The job did not finish for a reason that may pass: run it again after `delay_s` (None: the pool's default)."""

    def __init__(self, reason: str, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class PermanentFailure(Exception):
    """Running the job again will not help: report it and drop the message.

    `input_rejected` when the master itself is at fault (undecodable, smaller than every rendition asked
    for, larger than this deployment takes): a person's retry of the same request cannot succeed either,
    so the store does not offer one. Without it (the master was gone, the event malformed) a person may
    put things right and retry.
    """

    def __init__(self, reason: str, *, input_rejected: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.input_rejected = input_rejected


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
        self, message: ReceivedMessage, context: JobContext, *, permanent: bool, reason: str, input_rejected: bool
    ) -> None:
        """Announce a failed attempt (the `cattube.transcode.failed` event)."""
        ...


def video_id_of(message: ReceivedMessage) -> str | None:
    return contract.video_id_of(message.event)


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
        receive_batch_max: int = RECEIVE_BATCH_MAX,
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
        self.receive_batch_max = receive_batch_max
        self.workers: set[Worker] = set()
        self.on_idle = on_idle
        self.on_outcome = on_outcome
        self.handed_back = 0
        """Messages received with no idle worker left to take them, nacked at once."""
        self._threads = threads
        self._names = (f"{name_prefix}-{n}" for n in itertools.count(1))
        self._stopping = asyncio.Event()
        self._deadline: float | None = None
        # Idle workers, oldest first, each waiting on its future: a message, or None to leave.
        self._waiting: dict[Worker, asyncio.Future[ReceivedMessage | None]] = {}
        self._demand = asyncio.Event()
        self._receiver: asyncio.Task[None] | None = None
        self._receiving: asyncio.Task[list[ReceivedMessage]] | None = None

    # -- what the autoscaler sees -----------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers if not w.retiring)

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers if w.busy and not w.retiring)

    @property
    def retiring(self) -> int:
        """Retired workers not gone yet (a moment at most: retiring an idle worker is immediate)."""
        return sum(1 for w in self.workers if w.retiring)

    def grow(self, count: int) -> None:
        if self._stopping.is_set():
            return
        loop = asyncio.get_running_loop()
        if self._receiver is None:
            self._receiver = loop.create_task(self._receive_loop(), name="receiver")
        for _ in range(count):
            worker = Worker(next(self._names))
            worker.task = loop.create_task(self._run(worker), name=worker.name)
            self.workers.add(worker)

    def shrink(self, count: int) -> int:
        """Retire up to `count` idle workers now; if none is left idle, the pending receive is cancelled."""
        idle = [w for w in self.workers if not w.busy and not w.retiring][:count]
        for worker in idle:
            worker.retiring = True
            self._release(worker)
        self._cancel_unwanted_receive()
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
        """Take no more jobs: idle workers leave, the receive is cancelled; busy ones have `grace_s` (see `drain`)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._deadline = time.monotonic() + grace_s
        for worker in list(self._waiting):
            self._release(worker)
        self._cancel_unwanted_receive()
        self._demand.set()  # the receive loop, if it waits for demand, wakes up and ends

    async def drain(self) -> None:
        """Wait for busy workers until the grace period ends, then cancel them (their messages are nacked)."""
        if self._deadline is None:
            self.begin_stop(0)
        assert self._deadline is not None
        tasks = [w.task for w in self.workers if w.task is not None]
        if self._receiver is not None:
            tasks.append(self._receiver)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, self._deadline - time.monotonic()))
        jobs = sum(1 for task in pending if task is not self._receiver)
        if jobs:
            log.warning("stopping %d running job(s); they go back to the queue", jobs)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the receive loop -------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        """Long-poll for as many messages as there are idle workers (at most `receive_batch_max`)."""
        failures = 0
        while not self._stopping.is_set():
            if not self._waiting:
                self._demand.clear()
                await self._demand.wait()
                continue
            wanted = min(self.receive_batch_max, len(self._waiting))
            receiving = self._receiving = asyncio.ensure_future(
                self.queue.receive(
                    max_messages=wanted, wait_s=self.receive_wait_s, visibility_timeout_s=self.visibility_timeout_s
                )
            )
            try:
                await asyncio.wait({receiving})
            except asyncio.CancelledError:
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)
                if not receiving.cancelled() and receiving.exception() is None:
                    await self._hand_back(receiving.result())
                raise
            finally:
                self._receiving = None
            if receiving.cancelled():
                continue  # no idle worker is left (a pause, a scale-in, shutdown)
            exc = receiving.exception()
            if exc is not None:
                # Whatever went wrong (the router away, an answer that makes no sense), the idle workers
                # depend on this loop: back off and try again rather than die.
                failures += 1
                delay = full_jitter(failures, 0.2, RECEIVE_BACKOFF_MAX_S)
                detail = exc if isinstance(exc, RouterError) else repr(exc)
                log.warning("cannot receive jobs (%s); trying again in %.1f s", detail, delay)
                await self._sleep_unless_stopping(delay)
                continue
            failures = 0
            await self._hand_out(receiving.result())

    async def _hand_out(self, messages: list[ReceivedMessage]) -> None:
        """Give each message to an idle worker; hand back at once what no idle worker is left for."""
        surplus = []
        for message in messages:
            if self._waiting and not self._stopping.is_set():
                worker = next(iter(self._waiting))
                # No await between here and the worker's future: shutdown and scale-in never take it for idle.
                worker.busy = True
                worker.video_id = video_id_of(message)
                self._waiting.pop(worker).set_result(message)
            else:
                surplus.append(message)
        await self._hand_back(surplus)

    async def _hand_back(self, messages: list[ReceivedMessage]) -> None:
        if not messages:
            return
        self.handed_back += len(messages)
        log.info("handing back %d job(s) received after the workers were retired or stopped", len(messages))
        await self._settle_all("nack", messages, delay_s=0)

    def _release(self, worker: Worker) -> None:
        waiting = self._waiting.pop(worker, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _cancel_unwanted_receive(self) -> None:
        if not self._waiting and self._receiving is not None:
            self._receiving.cancel()

    # -- one worker -------------------------------------------------------------------------------

    async def _run(self, worker: Worker) -> None:
        try:
            while not self._stopping.is_set() and not worker.retiring:
                message = await self._next_message(worker)
                if message is None:
                    break
                await self._process(worker, message)
        finally:
            self._release(worker)
            self.workers.discard(worker)

    async def _next_message(self, worker: Worker) -> ReceivedMessage | None:
        waiting: asyncio.Future[ReceivedMessage | None] = asyncio.get_running_loop().create_future()
        self._waiting[worker] = waiting
        self._demand.set()
        try:
            return await waiting
        except asyncio.CancelledError:
            # Cancelled just as a message was handed over: give it back rather than let it wait out its lease.
            if waiting.done() and not waiting.cancelled() and (message := waiting.result()) is not None:
                await self._settle("nack", message, delay_s=0)
            raise

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def _process(self, worker: Worker, message: ReceivedMessage) -> None:
        worker.busy = True
        worker.video_id = video_id_of(message)
        # Every live worker may run an ffmpeg: share the CPUs among them.
        context = JobContext(worker.name, self._threads(max(1, len(self.workers))))
        started = time.monotonic()
        job = worker.job = asyncio.get_running_loop().create_task(self.handler.run(message, context))
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(message))
        try:
            try:
                await asyncio.wait({job})
            except asyncio.CancelledError:
                # Shutdown past the grace period: stop the job (its ffmpeg dies with it, its partial
                # outputs are removed) and hand the message back at once, so another worker can take it.
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
            if await self._report(
                message, context, permanent=True, reason=exc.reason, input_rejected=exc.input_rejected
            ):
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
            await self._report(message, context, permanent=False, reason=reason, input_rejected=False)
            await self._settle("nack", message, delay_s=delay_s)
            self._outcome("retried", started)

    async def _report(
        self, message: ReceivedMessage, context: JobContext, *, permanent: bool, reason: str, input_rejected: bool
    ) -> bool:
        try:
            await self.handler.report_failure(
                message, context, permanent=permanent, reason=reason, input_rejected=input_rejected
            )
        except Exception:
            log.exception("could not announce the failure of video %s", video_id_of(message))
            return False
        return True

    async def _settle(self, verb: str, message: ReceivedMessage, *, delay_s: float = 0) -> None:
        await self._settle_all(verb, [message], delay_s=delay_s)

    async def _settle_all(self, verb: str, messages: list[ReceivedMessage], *, delay_s: float = 0) -> None:
        """Ack or nack, bounded in time; if it fails the visibility timeout brings the messages back anyway."""
        videos = ", ".join(str(video_id_of(m)) for m in messages)
        timeout_s = HANDBACK_TIMEOUT_S if self._stopping.is_set() else SETTLE_TIMEOUT_S
        try:
            async with asyncio.timeout(timeout_s):
                receipts = [m.receipt for m in messages]
                if verb == "ack":
                    results = await self.queue.ack(receipts)
                else:
                    results = await self.queue.nack(receipts, delay_s=delay_s)
        except TimeoutError:
            log.warning(
                "%s of video %s failed (no answer from the router within %g s); "
                "it comes back after its visibility timeout",
                verb,
                videos,
                timeout_s,
            )
            return
        except RouterError as exc:
            log.warning("%s of video %s failed (%s); it comes back after its visibility timeout", verb, videos, exc)
            return
        for message, result in zip(messages, results, strict=False):
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
