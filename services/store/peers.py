"""Changes other store replicas applied, heard through the database and shown on this replica's pages.

    peers = PeerChanges(db, live)
    supervisor.start("peer-changes", peers.run())   # on PostgreSQL only: a SQLite file has one writer
    peers.stop()

Every store replica applies the router's pushes and people's commands to one PostgreSQL catalog,
and its own pages hear its own changes at once (`Live`). What the others change arrives here: the
catalog's tables announce each committed change on `store_changes` (a trigger, after commit), this
replica listens on one connection, loads what changed and publishes it to its live streams. Its
own announcements are skipped (they name this replica's connections), so a page sees each change
once. When the listening connection was lost, some announcements may have been missed: every
live stream is ended then, and browsers reconnect and reload their lists, as after any gap.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from services.common.db import Database
from services.common.errors import Unavailable
from services.store import tables
from services.store.live import Change, Live

log = logging.getLogger(__name__)


class PeerChanges:
    def __init__(self, db: Database, live: Live, *, history_size: int, channel: str = tables.CHANGES_CHANNEL) -> None:
        self.db = db
        self.live = live
        self.history_size = history_size  # the fleet after a change is counted over the history the chart keeps
        self.channel = channel
        self.heard_total = 0
        self.listening = asyncio.Event()
        """Set once this replica hears the others (again after each gap)."""
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._task = asyncio.current_task()
        async for payload in self.db.notifications(self.channel):
            if payload is None:  # listening (again): what was said before is not known here
                self.live.resync()
                self.listening.set()
                continue
            note = json.loads(payload)
            if note.get("origin") == self.db.origin:
                continue  # this replica's own change: its pages heard it already
            try:
                await self._show(note)
            except Unavailable as exc:
                log.warning("cannot load a change another replica made (%s); pages will reload", exc.detail)
                self.live.resync()

    def stop(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _show(self, note: dict[str, Any]) -> None:
        self.heard_total += 1
        if note.get("table") == "videos":
            video = await self.db.transact(tables.load_video, str(note["key"]))
            if video is not None:
                self.live.publish(Change("video", video=video))
        elif note.get("table") == "scaling":
            point = await self.db.transact(tables.scaling_point, int(note["key"]), self.history_size)
            if point is not None:
                self.live.publish(Change("scaled", point=point))
