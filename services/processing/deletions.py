"""The consumer of `cattube.video.deleted`: stop the video's jobs, then remove every blob it has.

For each deleted video, in this order: remember it (a job that starts later, or finishes
later, sees it and drops its work), cancel any running job for it (its ffmpeg is killed, its
work directory removed), then delete everything under `videos/{id}/`. Deleting is idempotent,
so a redelivered event does no harm.

Unlike the transcode queue, which every instance shares, each instance has a deletion queue of
its own (`deletions_queue_name`, named after `CATTUBE_INSTANCE`): every instance hears of every
deletion, so a job for that video is cancelled wherever it runs. The name is stable across
restarts, so a restart takes up its queue again (and what was deleted meanwhile) rather than
leaving it behind and declaring a new one. An instance retired for good leaves its queue: delete
it (`DELETE /subscriptions/{name}` on the router).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import OrderedDict

from router.client import QueueConsumer, ReceivedMessage, RouterError, full_jitter
from services.common import contract
from services.common.blobs import BlobStore, video_key
from services.common.errors import InvalidInput
from services.processing.worker import WorkerPool

log = logging.getLogger(__name__)

REMEMBERED_MAX = 10_000
RETRY_DELAY_S = 10.0
DELETIONS_QUEUE_PREFIX = "processing-deletions-"
# The router's subscription names: [A-Za-z0-9][A-Za-z0-9._-]{0,79}.
SUBSCRIPTION_NAME_MAX = 80
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]")


def deletions_queue_name(instance: str) -> str:
    """This instance's deletion queue: `processing-deletions-{instance}`, made a valid subscription name.

    Characters the router does not allow become `-`; a name that had any, or that is too long, ends in a
    hash of the instance name instead of its tail, so two instance names never share one queue.
    """
    safe = _NOT_ALLOWED.sub("-", instance)
    name = DELETIONS_QUEUE_PREFIX + safe
    if safe == instance and len(name) <= SUBSCRIPTION_NAME_MAX:
        return name
    digest = hashlib.sha256(instance.encode()).hexdigest()[:12]
    return f"{name[: SUBSCRIPTION_NAME_MAX - len(digest) - 1]}-{digest}"


class DeletionConsumer:
    def __init__(
        self,
        queue: QueueConsumer,
        store: BlobStore,
        pool: WorkerPool,
        *,
        receive_wait_s: float = 20,
        visibility_timeout_s: float = 60,
    ) -> None:
        self.queue = queue
        self.store = store
        self.pool = pool
        self.receive_wait_s = receive_wait_s
        self.visibility_timeout_s = visibility_timeout_s
        self.deleted_total = 0
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def is_deleted(self, video_id: str) -> bool:
        return video_id in self._deleted

    async def run(self) -> None:
        self._task = asyncio.current_task()
        failures = 0
        while not self._stopped:
            try:
                messages = await self.queue.receive(
                    max_messages=10, wait_s=self.receive_wait_s, visibility_timeout_s=self.visibility_timeout_s
                )
            except RouterError as exc:
                failures += 1
                delay = full_jitter(failures, 0.2, 10.0)
                log.warning("cannot receive deletions (%s); trying again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            for message in messages:
                try:
                    await self._handle(message)
                except RouterError as exc:  # the ack was lost: the message comes back, deleting again is harmless
                    log.warning("settling a deletion failed: %s", exc)

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _handle(self, message: ReceivedMessage) -> None:
        try:
            video_id = contract.parse(message.event, contract.VideoDeleted).video_id
        except InvalidInput as exc:
            log.error("ignoring a malformed deletion event %s: %s", message.event.get("id"), exc)
            await self.queue.ack([message.receipt])
            return
        prefix = video_key(video_id, "x")[:-1]
        self._remember(video_id)
        try:
            cancelled = await self.pool.cancel_video(video_id)
            removed = await self.store.delete_prefix(prefix)
        except OSError as exc:
            log.warning("deleting the blobs of video %s failed (%s); retrying in %g s", video_id, exc, RETRY_DELAY_S)
            await self.queue.nack([message.receipt], delay_s=RETRY_DELAY_S)
            return
        self.deleted_total += 1
        log.info("video %s deleted: %d job(s) cancelled, %d blob(s) removed", video_id, cancelled, removed)
        await self.queue.ack([message.receipt])

    def _remember(self, video_id: str) -> None:
        self._deleted[video_id] = None
        self._deleted.move_to_end(video_id)
        while len(self._deleted) > REMEMBERED_MAX:
            self._deleted.popitem(last=False)
