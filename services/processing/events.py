"""The events the processing service publishes, and the one ordered outbox they leave through.

Every event has source `cattube/processing` and, when it is about a video, `partitionkey` = the
video id (so ordered consumers see one video's events in order). Ids are fixed by what the event
stands for, so a publish retried after a lost answer is recognized as the same event:

    cattube.transcode.started     {video_id}/started/{run}
    cattube.transcode.progress    {video_id}/progress/{run}/{n}
    cattube.transcode.completed   {video_id}/completed/{run}
    cattube.transcode.failed      {video_id}/failed/{run}
    cattube.processing.scaled     scaled/{instance}/{start}/{n}

`start` is drawn at random when the service starts: the instance name is stable across
restarts, and `n` counts from 1 again. `run` names one delivery of one job message:
`{sequence}.{attempt}-{hash of the receipt}`. Each attempt is a new run (its outcome is news),
and a dead letter redriven with its attempt count reset still gets new ids, since its receipt is new.

Every event leaves through a durable outbox (`services.common.outbox`, a SQLite file under
`DATA_DIR/processing`, or the `processing` schema on PostgreSQL, where each instance's rows carry
its name and only it relays them, in its order): when the router is away, or gone at shutdown, the
events wait in the database and are published, in order, once it is back, after a restart too.
Nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import Mapping
from typing import Any

from router.client import ReceivedMessage, RouterClient, new_event
from services.common import contract, outbox
from services.common.db import Connection, Database
from services.common.errors import Unavailable
from services.common.outbox import OutboxRelay

log = logging.getLogger(__name__)

SOURCE = "cattube/processing"
BATCH_MAX = 50
# Announced progress waits up to this long for company before it is written and relayed: every running
# job reports once a second, so one write and one POST carry all of them instead of one each. Anything
# else (started, completed, failed, an awaited publish) ends the wait at once, progress included.
PROGRESS_LINGER_S = 1.0
PROGRESS = "cattube.transcode.progress"


def run_id(message: ReceivedMessage) -> str:
    tag = hashlib.sha256(message.receipt.encode()).hexdigest()[:8]
    return f"{message.sequence}.{message.attempt}-{tag}"


def _video_event(kind: str, data: contract.EventData, run: str, suffix: str = "") -> dict[str, Any]:
    video_id = data.video_id  # type: ignore[attr-defined]  # every transcode.* model has one
    return new_event(
        f"cattube.transcode.{kind}", SOURCE, data.dump(), id=f"{video_id}/{kind}/{run}{suffix}", partitionkey=video_id
    )


def started(video_id: str, run: str, *, worker: str, attempt: int, instance: str) -> dict[str, Any]:
    data = contract.TranscodeStarted(video_id=video_id, worker=worker, attempt=attempt, instance=instance)
    return _video_event("started", data, run)


def progress(video_id: str, run: str, n: int, *, percent: float, speed: float) -> dict[str, Any]:
    data = contract.TranscodeProgress(video_id=video_id, percent=round(percent, 1), speed=round(speed, 2))
    return _video_event("progress", data, run, f"/{n}")


def completed(
    video_id: str,
    run: str,
    *,
    renditions: list[contract.Rendition],
    skipped: list[str],
    poster_uri: str,
    hls_uri: str,
    elapsed_s: float,
    worker: str,
    attempt: int,
) -> dict[str, Any]:
    data = contract.TranscodeCompleted(
        video_id=video_id,
        renditions=renditions,
        skipped=skipped,
        poster=contract.Poster(uri=poster_uri),
        hls=contract.Hls(uri=hls_uri),
        elapsed_s=round(elapsed_s, 3),
        worker=worker,
        attempt=attempt,
    )
    return _video_event("completed", data, run)


def failed(
    video_id: str, run: str, *, attempt: int, permanent: bool, reason: str, input_rejected: bool = False
) -> dict[str, Any]:
    data = contract.TranscodeFailed(
        video_id=video_id, attempt=attempt, permanent=permanent, reason=reason, input_rejected=input_rejected
    )
    return _video_event("failed", data, run)


def scaled(
    instance: str, start: str, n: int, *, from_: int, to: int, backlog: int, in_flight: int, busy: int, reason: str
) -> dict[str, Any]:
    data = contract.ProcessingScaled(
        from_=from_, to=to, backlog=backlog, in_flight=in_flight, busy=busy, reason=reason, instance=instance
    )
    return new_event(contract.PROCESSING_SCALED, SOURCE, data.dump(), id=f"scaled/{instance}/{start}/{n}")


class OutboxUnavailable(Exception):
    """The event could not be written to the outbox (a full disk, a closed database)."""


POSTGRES_SCHEMA = "processing"
MIGRATIONS = (outbox.OUTBOX,)


def _enqueue_all(conn: Connection, events: list[Mapping[str, Any]], owner: str) -> None:
    for event in events:
        outbox.enqueue(conn, event, owner)


def _pending(conn: Connection, owner: str) -> int:
    return outbox.counts(conn, owner)[0]


def _may_wait(event: Mapping[str, Any] | None, done: asyncio.Future[None] | None) -> bool:
    """Announced progress may wait for company; nothing else may (nobody waits on it, and it is the least news)."""
    return done is None and event is not None and event.get("type") == PROGRESS


class EventSink:
    """One ordered way out for every event: `announce` (fire and forget) and `publish` (wait until durable).

    Both go through one in-memory queue that `run()` writes to the outbox in batches (one
    transaction each), so a job's `started`, its progress and its `completed` reach the router in
    the order they happened, and a slow or absent router never blocks a job. `publish` returns once
    the event is on disk: the router takes it when it can (`relay`, run by `run_relay()`).

        sink = EventSink(db, router_client_with_no_retries, owner=instance)   # db: made with MIGRATIONS
        await sink.open()
        ...  run() and run_relay() in the background
        await sink.close(timeout_s=2)    # writes what is queued; the router gets up to 2 s for the rest
    """

    def __init__(
        self, db: Database, client: RouterClient, *, owner: str = "", progress_linger_s: float = PROGRESS_LINGER_S
    ) -> None:
        self.db = db
        self.owner = owner
        self.progress_linger_s = progress_linger_s
        self.relay = OutboxRelay(db, client, on_published=self._on_published, owner=owner)
        # None instead of an event: write what is held now (close() wants no lingering).
        self._queue: asyncio.Queue[tuple[Mapping[str, Any] | None, asyncio.Future[None] | None]] = asyncio.Queue()
        self._published = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._relaying: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self) -> None:
        await self.db.open()
        try:
            pending = await self.db.transact(_pending, self.owner)
        except Unavailable as exc:  # the relay waits for it; events are refused until it is back
            log.warning("the outbox cannot be read yet: %s", exc.detail)
            return
        if pending:
            log.info("%d event(s) in the outbox from an earlier run; publishing them first", pending)

    def announce(self, event: Mapping[str, Any]) -> None:
        self._queue.put_nowait((event, None))

    async def publish(self, event: Mapping[str, Any]) -> None:
        """Returns once `event` is durable in the outbox; raises `OutboxUnavailable` if it could not be written."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, done))
        await done

    async def run(self) -> None:
        """Write queued events to the outbox, in order, in batches."""
        self._writer = asyncio.current_task()
        while not self._closed:
            batch = [await self._queue.get()]
            try:
                await self._fill(batch)
                await self._write([(event, done) for event, done in batch if event is not None])
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _fill(self, batch: list[tuple[Mapping[str, Any] | None, asyncio.Future[None] | None]]) -> None:
        """Add what is queued to `batch`; while it holds only announced progress, wait a little for more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.progress_linger_s
        while len(batch) < BATCH_MAX:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0 or not all(_may_wait(event, done) for event, done in batch):
                    return
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    return
            else:
                batch.append(self._queue.get_nowait())

    async def run_relay(self) -> None:
        """Publish the outbox to the router (see `OutboxRelay`)."""
        self._relaying = asyncio.current_task()
        if not self._closed:
            await self.relay.run()

    async def close(self, timeout_s: float) -> None:
        """Write what is still queued, give the router up to `timeout_s` to take the outbox, then stop.

        What the router has not taken stays in the outbox for the next start.
        """
        with contextlib.suppress(TimeoutError, sqlite3.Error, Unavailable):
            async with asyncio.timeout(timeout_s):
                if self._writer is not None:
                    self._queue.put_nowait((None, None))  # no lingering: write what is held now
                    await self._queue.join()
                while True:
                    self._published.clear()  # before counting: a publish from here on sets it again
                    if not await self.db.transact(_pending, self.owner):
                        break
                    await self._published.wait()
        self._closed = True
        self.relay.stop()
        for task in (self._writer, self._relaying):
            # A publish cut short is harmless: the events stay in the outbox and their ids are fixed.
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        left = 0
        while not self._queue.empty():
            event, _ = self._queue.get_nowait()
            left += event is not None
        if left:  # the database would not take them: say so, loudly
            log.error("%d event(s) could not be written to the outbox before shutdown", left)
        with contextlib.suppress(sqlite3.Error, Unavailable):
            if pending := await self.db.transact(_pending, self.owner):
                log.warning(
                    "%d event(s) kept in the outbox (%s): the router did not take them before shutdown; "
                    "they are published after the next start",
                    pending,
                    self.db.where,
                )
        await self.db.close()

    def _on_published(self, count: int) -> None:
        self._published.set()

    async def _write(self, batch: list[tuple[Mapping[str, Any], asyncio.Future[None] | None]]) -> None:
        if not batch:
            return
        try:
            await self.db.transact(_enqueue_all, [event for event, _ in batch], self.owner)
        except (sqlite3.Error, Unavailable, OSError) as exc:
            log.error("could not write %d event(s) to the outbox at %s: %s", len(batch), self.db.where, exc)
            failure = OutboxUnavailable(f"the outbox at {self.db.where} could not be written ({exc})")
            for _, done in batch:
                if done is not None and not done.done():
                    done.set_exception(failure)
            return
        for _, done in batch:
            if done is not None and not done.done():
                done.set_result(None)
        self.relay.wake()
