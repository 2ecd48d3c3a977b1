"""In-memory fan-out of catalog changes to the page's live streams (`GET /events`): no polling anywhere.

    async with live.listen() as changes:        # one per connected page
        while (change := await changes.get()) is not None:
            ...
    live.publish(Change("video", video=video))  # after each committed change

Each listener has a bounded queue. A listener that falls that far behind (a stalled tab) is
dropped: its queue is emptied and closed, its stream ends, and the browser's EventSource
reconnects and reloads the lists. A slow page never holds back the catalog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from services.store.records import ScalingPoint, Video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    kind: Literal["video", "scaled"]
    video: Video | None = None
    point: ScalingPoint | None = None


class Live:
    def __init__(self, queue_size: int = 1000) -> None:
        self.queue_size = queue_size
        self.dropped_total = 0
        self._queues: set[asyncio.Queue[Change | None]] = set()
        self._closed = False

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def publish(self, change: Change) -> None:
        for queue in list(self._queues):
            if queue.qsize() >= self.queue_size:
                self._drop(queue)
            else:
                queue.put_nowait(change)

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[asyncio.Queue[Change | None]]:
        """A queue of changes from now on; `None` means the stream is over (shutdown, or too far behind)."""
        queue: asyncio.Queue[Change | None] = asyncio.Queue(self.queue_size + 1)  # room for the closing None
        if self._closed:
            queue.put_nowait(None)
        else:
            self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    def resync(self) -> None:
        """End every open stream, its browser reconnects and reloads the lists: some changes may have been missed."""
        for queue in list(self._queues):
            self._end(queue)

    def close(self) -> None:
        """End every stream (the service is stopping: open streams must not hold up the shutdown)."""
        self._closed = True
        for queue in list(self._queues):
            self._end(queue)

    def _drop(self, queue: asyncio.Queue[Change | None]) -> None:
        self.dropped_total += 1
        log.info("a live listener fell %d changes behind and was dropped", self.queue_size)
        self._end(queue)

    def _end(self, queue: asyncio.Queue[Change | None]) -> None:
        self._queues.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)
