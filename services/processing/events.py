"""The events the processing service publishes, and the one ordered outbox they leave through.

Every event has source `cattube/processing` and, when it is about a video, `partitionkey` = the
video id (so ordered consumers see one video's events in order). Ids are fixed by what the event
stands for, so a publish retried after a lost answer is recognized as the same event:

    cattube.transcode.started     {video_id}/started/{run}
    cattube.transcode.progress    {video_id}/progress/{run}/{n}
    cattube.transcode.completed   {video_id}/completed/{run}
    cattube.transcode.failed      {video_id}/failed/{run}
    cattube.processing.scaled     scaled/{instance}/{n}

`run` names one delivery of one job message: `{sequence}.{attempt}-{hash of the receipt}`. Each
attempt is a new run (its outcome is news), and a dead letter redriven with its attempt count
reset still gets new ids, since its receipt is new.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from router.client import ReceivedMessage, RouterClient, RouterError, new_event

log = logging.getLogger(__name__)

SOURCE = "cattube/processing"
BATCH_MAX = 50
PENDING_MAX = 10_000


def run_id(message: ReceivedMessage) -> str:
    tag = hashlib.sha256(message.receipt.encode()).hexdigest()[:8]
    return f"{message.sequence}.{message.attempt}-{tag}"


def _video_event(kind: str, video_id: str, run: str, data: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    return new_event(
        f"cattube.transcode.{kind}",
        SOURCE,
        {"video_id": video_id, **data},
        id=f"{video_id}/{kind}/{run}{suffix}",
        partitionkey=video_id,
    )


def started(video_id: str, run: str, *, worker: str, attempt: int) -> dict[str, Any]:
    return _video_event("started", video_id, run, {"worker": worker, "attempt": attempt})


def progress(video_id: str, run: str, n: int, *, percent: float, speed: float) -> dict[str, Any]:
    return _video_event("progress", video_id, run, {"percent": round(percent, 1), "speed": round(speed, 2)}, f"/{n}")


def completed(
    video_id: str,
    run: str,
    *,
    renditions: list[dict[str, Any]],
    skipped: list[str],
    poster_uri: str,
    elapsed_s: float,
    worker: str,
    attempt: int,
) -> dict[str, Any]:
    data = {
        "renditions": renditions,
        "skipped": skipped,
        "poster": {"uri": poster_uri},
        "elapsed_s": round(elapsed_s, 3),
        "worker": worker,
        "attempt": attempt,
    }
    return _video_event("completed", video_id, run, data)


def failed(video_id: str, run: str, *, attempt: int, permanent: bool, reason: str) -> dict[str, Any]:
    return _video_event("failed", video_id, run, {"attempt": attempt, "permanent": permanent, "reason": reason})


def scaled(instance: str, n: int, *, from_: int, to: int, backlog: int, in_flight: int, reason: str) -> dict[str, Any]:
    data = {"from": from_, "to": to, "backlog": backlog, "in_flight": in_flight, "reason": reason}
    return new_event("cattube.processing.scaled", SOURCE, data, id=f"scaled/{instance}/{n}")


class EventSink:
    """One ordered way out for every event: `announce` (fire and forget) and `publish` (wait until durable).

    Both go through one queue drained by `run()` in batches, so a job's `started`, its progress
    and its `completed` reach the router in the order they happened, and a slow or absent router
    never blocks a job's progress callback. Announcements that cannot be published (the router
    stays down through the client's retries) are dropped with a warning; `publish` raises instead.
    """

    def __init__(self, client: RouterClient, *, pending_max: int = PENDING_MAX) -> None:
        self.client = client
        self.dropped = 0
        self._queue: asyncio.Queue[tuple[Mapping[str, Any], asyncio.Future[None] | None]] = asyncio.Queue()
        self._pending_max = pending_max
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def announce(self, event: Mapping[str, Any]) -> None:
        if self._queue.qsize() >= self._pending_max:
            self.dropped += 1
            log.warning(
                "dropping %s %s: %d events already wait for the router", event["type"], event["id"], self._pending_max
            )
            return
        self._queue.put_nowait((event, None))

    async def publish(self, event: Mapping[str, Any]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, done))
        await done

    async def run(self) -> None:
        self._task = asyncio.current_task()
        while not self._closing:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._send(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def close(self, timeout_s: float) -> None:
        """Send what is still queued, for at most `timeout_s`, then stop `run()`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        self._closing = True  # and if run() has not started yet, it never will
        if not self._queue.empty():
            log.warning("%d event(s) not published before shutdown", self._queue.qsize())
        if self._task is not None:
            self._task.cancel()

    async def _send(self, batch: list[tuple[Mapping[str, Any], asyncio.Future[None] | None]]) -> None:
        try:
            await self.client.publish_batch([event for event, _ in batch])
        except asyncio.CancelledError:
            stopped = RouterError(503, {"title": "Not published", "detail": "the service is shutting down"})
            for _, done in batch:
                if done is not None and not done.done():
                    done.set_exception(stopped)
            raise
        except (RouterError, OSError) as exc:
            announced = sum(1 for _, done in batch if done is None)
            if announced:
                self.dropped += announced
                log.warning("could not publish %d event(s), dropped: %s", announced, exc)
            for _, done in batch:
                if done is not None and not done.done():
                    done.set_exception(exc)
        else:
            for _, done in batch:
                if done is not None and not done.done():
                    done.set_result(None)
