"""The catalog: every video and its renditions, built only from the events the router pushes.

    catalog = Catalog(db, public_url="http://127.0.0.1:8703", on_change=notify)   # notify(outcome) after a commit
    await catalog.apply(event)          # each delivery, verified; repeats and stale events change nothing
    video = await catalog.get("v1")     # or catalog.page(limit=20, status="ready")
    await catalog.request_retry("v1")   # a person asks: failed -> processing, `retry-requested` owed
    await catalog.edit("v1", title="Mittens", description="Asleep again")   # `updated` owed
    await catalog.delete("v1")          # tombstone, `deleted` owed

Each event is applied once: its `source`+`id` is recorded in the transaction that applies it, so
a redelivery is recognized and changes nothing. Events may also arrive late or out of order
(the router retries, replays, and only orders one video's events among themselves), so a status
only moves forward:

    uploaded -> processing -> failed -> ready -> deleted     (any step may be skipped)

`failed` ranks below `ready` on purpose: a `transcode.completed` means the renditions are in the
bucket and playable, whatever an earlier attempt reported (a dead letter redriven by an operator
can still succeed). A late `failed` never takes a ready video back. A `transcode.failed` with
`permanent: false` keeps the video processing (the queue gives the job to a worker again) and
is shown as `last_error`; the video fails when the failure is permanent or when the router
dead-letters the job (`cattube.router.dead-lettered` from the transcode queue). An event that
arrives before the video's `uploaded` creates the row with what it knows; the upload fills in
the rest without moving the status back. `deleted` is final: the row stays as a tombstone and
every later event about the video is ignored.

The one step back is a person's: `request_retry` moves a failed video to processing and starts a
new *round*; not a video whose failure says `input_rejected` (its master cannot become what was
asked, so the same request would fail the same way). A dead letter from an earlier round (its job
was the upload, or an older retry) no longer fails the video. When a video becomes ready or
failed, the `cattube.video.ready` / `.failed` event is recorded in the outbox in the same
transaction.

A person's edit of the title or description (`edit`) is the other command: it counts the video's
`edits` and owes `cattube.video.updated` with the whole of the new text and that count as its
`revision`. An update event is applied only if its revision is higher than the video's (so the
store's own, coming back through its subscription, changes nothing, and a late one never undoes a
newer edit), and once a video has been edited, its upload event no longer sets the title.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from router.client import new_event
from services.common import contract, outbox
from services.common.blobs import video_key
from services.common.db import Connection, Database
from services.common.errors import Conflict, InvalidInput, NotFound
from services.common.text import MAX_DESCRIPTION_CHARS, MAX_TITLE_CHARS, one_line, paragraphs
from services.store import tables
from services.store.fleet import ScalingHistory
from services.store.records import Rendition, ScalingPoint, Video
from services.store.tables import Page

log = logging.getLogger(__name__)

SOURCE = "cattube/store"
UPLOADED, RETRY_REQUESTED = contract.UPLOADED, contract.RETRY_REQUESTED
PRUNE_EVERY = 1000


@dataclass
class Outcome:
    """What one change did: the videos it changed, an autoscaler point, how many events it owes the router."""

    duplicate: bool = False
    ignored: str | None = None
    videos: list[Video] = field(default_factory=list)
    scaled: ScalingPoint | None = None
    announced: int = 0


Handler = Callable[[Connection, Mapping[str, Any], float], Outcome]


class Catalog:
    def __init__(
        self,
        db: Database,
        *,
        public_url: str,
        subscription: str = "store",
        transcode_subscription: str = "transcode",
        history_size: int = 1000,
        applied_retention_s: float = 8 * 86_400,
        on_change: Callable[[Outcome], None] = lambda outcome: None,
    ) -> None:
        self.db = db
        self.public_url = public_url
        self.subscription = subscription
        self.transcode_subscription = transcode_subscription
        self.history_size = history_size
        self.applied_retention_s = applied_retention_s
        self.on_change = on_change
        self._applied_since_prune = 0
        self._handlers: dict[str, Handler] = {
            contract.UPLOADED: self._on_uploaded,
            contract.TRANSCODE_STARTED: self._on_started,
            contract.TRANSCODE_PROGRESS: self._on_progress,
            contract.TRANSCODE_COMPLETED: self._on_completed,
            contract.TRANSCODE_FAILED: self._on_failed,
            contract.DEAD_LETTERED: self._on_dead_lettered,
            contract.PROCESSING_SCALED: self._on_scaled,
            contract.VIDEO_DELETED: self._on_deleted,
            contract.VIDEO_UPDATED: self._on_updated,
        }

    # -- events -----------------------------------------------------------------------------------

    async def apply(self, event: Mapping[str, Any]) -> Outcome:
        """Apply one delivered CloudEvent; `InvalidInput` when it is not one the catalog can use."""
        outcome = await self.db.transact(self._apply, event, time.time())
        if outcome.ignored:
            log.debug("event %s %s ignored: %s", event.get("type"), event.get("id"), outcome.ignored)
        self._changed(outcome)
        return outcome

    def _apply(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        source, event_id, kind = (_attribute(event, name) for name in ("source", "id", "type"))
        if not tables.first_time(conn, source, event_id, now):
            return Outcome(duplicate=True)
        self._prune(conn, now)
        handler = self._handlers.get(kind)
        if handler is None:
            return Outcome(ignored=f"{kind} does not change the catalog")
        if kind == contract.VIDEO_DELETED and source == SOURCE:
            return Outcome(ignored="the store's own deletion, already applied")
        return handler(conn, event, now)

    def _on_uploaded(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.VideoUploaded)
        video = self._load_or_new(conn, data.video_id, now)
        if video.status == "deleted":
            return Outcome(ignored="the video was deleted")
        before = copy.deepcopy(video)
        # What an event left out stays as it was: a row created by an earlier event keeps what it learned,
        # and a title a person chose is newer than the upload's, whenever the upload arrives.
        if data.title is not None and not video.edits:
            video.title = data.title
        if data.master is not None:
            video.master = data.master.dump()
        if data.probe is not None:
            video.probe = data.probe.dump()
        if data.renditions is not None:
            video.requested = list(data.renditions)
        video.created_at = _event_time(event, now)
        return self._save(conn, video, before, now)

    def _on_started(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.TranscodeStarted)
        video = self._load_or_new(conn, data.video_id, now)
        if video.status not in ("uploaded", "processing"):
            return Outcome(ignored=f"a start after the video became {video.status}")
        before = copy.deepcopy(video)
        video.status = "processing"
        if data.attempt is not None and data.attempt != video.attempt:
            video.attempt = data.attempt
            video.progress = 0.0
        if video.progress is None:
            video.progress = 0.0
        if data.worker is not None:
            video.worker = data.worker
        video.speed = None
        return self._save(conn, video, before, now)

    def _on_progress(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.TranscodeProgress)
        video = self._load_or_new(conn, data.video_id, now)
        if video.status not in ("uploaded", "processing"):
            return Outcome(ignored=f"progress after the video became {video.status}")
        before = copy.deepcopy(video)
        video.status = "processing"
        # Out-of-order reports of one run must not make the bar go back; a new attempt resets it (`started`).
        video.progress = max(video.progress or 0.0, min(100.0, max(0.0, data.percent)))
        video.speed = data.speed
        return self._save(conn, video, before, now)

    def _on_completed(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.TranscodeCompleted)
        video = self._load_or_new(conn, data.video_id, now)
        if video.status == "deleted":
            return Outcome(ignored="the video was deleted")
        before = copy.deepcopy(video)
        became_ready = video.status != "ready"
        # Also on a ready video: a job run twice (at least once delivery) rewrote the same keys; keep its facts.
        video.status = "ready"
        video.renditions = [
            Rendition(r.name, r.uri, r.width, r.height, r.bitrate, r.size_bytes, r.duration_s) for r in data.renditions
        ]
        video.poster_uri = data.poster.uri if data.poster is not None else None
        video.hls_uri = data.hls.uri if data.hls is not None else None  # None from a processing before HLS
        if data.skipped is not None:
            video.skipped = list(data.skipped)
        video.elapsed_s = data.elapsed_s
        video.progress = 100.0
        video.speed = None
        video.error = None
        outcome = self._save(conn, video, before, now)
        if became_ready:
            outcome.announced += self._announce(
                conn, contract.VIDEO_READY, video, f"{video.video_id}/ready/{video.round}"
            )
        return outcome

    def _on_failed(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.TranscodeFailed)
        video = self._load_or_new(conn, data.video_id, now)
        if video.status not in ("uploaded", "processing"):
            return Outcome(ignored=f"a failure after the video became {video.status}")
        reason = data.reason or "Transcoding failed (no reason given)."
        before = copy.deepcopy(video)
        video.last_error = reason
        video.speed = None
        if not data.permanent:
            video.status = "processing"  # the queue gives the job to a worker again
            return self._save(conn, video, before, now)
        video.input_rejected = data.input_rejected
        return self._fail(conn, video, before, reason, now)

    def _on_dead_lettered(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.DeadLettered)
        subscription, job_type, job_id = data.subscription, data.event_type, data.event_id
        if subscription == self.subscription:
            log.error(
                "the router gave up delivering %s %s to the store after %s attempt(s): %s",
                job_type, job_id, data.attempts, data.last_error,
            )  # fmt: skip
            return Outcome(ignored="a dead letter of the store's own subscription")
        if subscription != self.transcode_subscription or job_type not in (UPLOADED, RETRY_REQUESTED):
            return Outcome(ignored=f"a dead letter of {subscription!r}, not a transcode job")
        video = self._load_or_new(conn, _video_id(event.get("partitionkey"), "partitionkey"), now)
        current_job = UPLOADED if video.round == 0 else RETRY_REQUESTED
        if job_type != current_job or (video.round and job_id != _retry_id(video.video_id, video.round)):
            return Outcome(ignored="a dead letter of an earlier round of this video")
        if video.status not in ("uploaded", "processing"):
            return Outcome(ignored=f"a dead letter after the video became {video.status}")
        cause = video.last_error or data.last_error or "no reason given"
        reason = f"Transcoding gave up after {data.attempts} attempt(s): {cause}"
        return self._fail(conn, video, copy.deepcopy(video), reason, now)

    def _on_scaled(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.ProcessingScaled)
        point = ScalingPoint(
            at=_event_time(event, now),
            from_=data.from_,
            to=data.to,
            backlog=data.backlog,
            in_flight=data.in_flight,
            reason=data.reason,
            instance=data.instance or "",
        )
        seq = tables.add_scaling(conn, point, self.history_size)
        # With the fleet after it, as the history tells it (a late change is placed at its own time).
        history = tables.scaling_history(conn, self.history_size)
        return Outcome(scaled=next((p for p in history.points if p.seq == seq), point))

    def _on_deleted(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.VideoDeleted)
        video = tables.load_video(conn, data.video_id)
        if video is None or video.status == "deleted":
            return Outcome(ignored="nothing to delete")
        return self._tombstone(conn, video, now)

    def _on_updated(self, conn: Connection, event: Mapping[str, Any], now: float) -> Outcome:
        data = contract.parse(event, contract.VideoUpdated)
        video = self._load_or_new(conn, data.video_id, now)
        if video.status == "deleted":
            return Outcome(ignored="the video was deleted")
        if data.revision <= video.edits:
            return Outcome(ignored=f"edit {data.revision} is not newer than edit {video.edits}")
        before = copy.deepcopy(video)
        video.edits = data.revision
        if data.title is not None:
            video.title = data.title
        video.description = data.description
        return self._save(conn, video, before, now)

    # -- commands ---------------------------------------------------------------------------------

    async def request_retry(self, video_id: str) -> Video:
        """Run a failed video again: it goes back to processing and `cattube.video.retry-requested` is owed."""
        outcome = await self.db.transact(self._retry, video_id, time.time())
        self._changed(outcome)
        return outcome.videos[0]

    def _retry(self, conn: Connection, video_id: str, now: float) -> Outcome:
        video = self._existing(conn, video_id)
        if video.status != "failed":
            raise Conflict(f"video {video_id} is {video.status}: only a failed video can be retried")
        if video.input_rejected:
            raise Conflict(
                f"video {video_id} cannot be retried: its master cannot become what was asked ({video.error}); "
                "running it again would fail the same way, so upload it again, as another file or with other renditions"
            )
        if not (video.master and isinstance(video.master.get("uri"), str) and video.probe and video.requested):
            raise Conflict(
                f"video {video_id} cannot be retried: the catalog never learned its master and probe "
                "(its upload event did not arrive); upload it again"
            )
        before = copy.deepcopy(video)
        video.round += 1
        video.status = "processing"
        video.error = video.last_error = video.speed = video.attempt = video.worker = None
        video.input_rejected = False
        video.progress = 0.0
        outcome = self._save(conn, video, before, now)
        data = contract.RetryRequested(
            video_id=video.video_id,
            title=video.title,
            renditions=video.requested,
            master=contract.Master.model_validate(video.master),
            probe=contract.Probe.model_validate(video.probe),
            round=video.round,
        )
        event = new_event(
            RETRY_REQUESTED, SOURCE, data.dump(), id=_retry_id(video.video_id, video.round), partitionkey=video.video_id
        )
        outbox.enqueue(conn, event)
        outcome.announced += 1
        return outcome

    async def edit(self, video_id: str, *, title: str | None = None, description: str | None = None) -> Video:
        """Change what a person edits (None leaves a field as it is; an empty description removes it).

        The text is cleaned (`services.common.text`) and checked after the video is found: `InvalidInput`
        names `body.title` (1 to 200 characters once cleaned) or `body.description` (at most 5000).
        A change owes `cattube.video.updated`; the same text again changes nothing and owes nothing.
        """
        outcome, video = await self.db.transact(self._edit, video_id, title, description, time.time())
        self._changed(outcome)
        return video

    def _edit(
        self, conn: Connection, video_id: str, title: str | None, description: str | None, now: float
    ) -> tuple[Outcome, Video]:
        video = self._existing(conn, video_id)
        before = copy.deepcopy(video)
        if title is not None:
            video.title = one_line(title)
            if not 1 <= len(video.title) <= MAX_TITLE_CHARS:
                raise InvalidInput(
                    "body.title", f"1 to {MAX_TITLE_CHARS} characters other than spaces and control characters"
                )
        if description is not None:
            video.description = paragraphs(description) or None
            if len(video.description or "") > MAX_DESCRIPTION_CHARS:
                raise InvalidInput("body.description", f"at most {MAX_DESCRIPTION_CHARS} characters")
        if video == before:
            return Outcome(), video
        video.edits += 1
        outcome = self._save(conn, video, before, now)
        data = contract.VideoUpdated(
            video_id=video.video_id, title=video.title, description=video.description, revision=video.edits
        )
        event_id = f"{video.video_id}/updated/{video.edits}"
        outbox.enqueue(conn, new_event(contract.VIDEO_UPDATED, SOURCE, data.dump(), id=event_id, partitionkey=video_id))
        outcome.announced += 1
        return outcome, video

    async def delete(self, video_id: str) -> Video:
        """Leave a tombstone and owe `cattube.video.deleted` (its consumer removes the blobs). Idempotent."""
        outcome = await self.db.transact(self._delete, video_id, time.time())
        self._changed(outcome)
        return outcome.videos[0]

    def _delete(self, conn: Connection, video_id: str, now: float) -> Outcome:
        video = tables.load_video(conn, _video_id(video_id, "path.video_id"))
        if video is None:
            # Where an upload's status_url leads: its event may still be on its way here.
            raise NotFound(f"no video {video_id} (a video just uploaded is here once its event arrives, in moments)")
        if video.status == "deleted":
            return Outcome(videos=[video])
        uris = video.blob_uris()
        outcome = self._tombstone(conn, video, now)
        data = contract.VideoDeleted(
            video_id=video.video_id, blob_uris=uris, prefix=video_key(video.video_id, "x")[:-1]
        )
        outbox.enqueue(
            conn,
            new_event(
                contract.VIDEO_DELETED, SOURCE, data.dump(), id=f"{video.video_id}/deleted", partitionkey=video_id
            ),
        )
        outcome.announced += 1
        return outcome

    # -- queries ----------------------------------------------------------------------------------

    async def get(self, video_id: str) -> Video:
        """The video; `NotFound` when there is none, or it was deleted."""
        return await self.db.transact(self._existing, video_id)

    async def page(self, *, limit: int, cursor: str | None = None, status: str | None = None) -> Page:
        """Newest first. Without `status`, deleted videos are left out; `status="deleted"` lists the tombstones."""
        return await self.db.transact(tables.list_videos, limit, cursor, status)

    async def scaling_history(self, limit: int) -> ScalingHistory:
        """The latest `limit` autoscaler changes of every processing instance, oldest first, and the fleet."""
        return await self.db.transact(tables.scaling_history, limit)

    async def counts(self) -> dict[str, int]:
        """How many videos have each status."""
        return await self.db.transact(tables.status_counts)

    # -- internals --------------------------------------------------------------------------------

    def _changed(self, outcome: Outcome) -> None:
        if outcome.videos or outcome.scaled or outcome.announced:
            self.on_change(outcome)

    def _fail(self, conn: Connection, video: Video, before: Video, reason: str, now: float) -> Outcome:
        video.status = "failed"
        video.error = reason
        video.speed = None
        outcome = self._save(conn, video, before, now)
        outcome.announced += self._announce(
            conn, contract.VIDEO_FAILED, video, f"{video.video_id}/failed/{video.round}"
        )
        return outcome

    def _tombstone(self, conn: Connection, video: Video, now: float) -> Outcome:
        before = copy.deepcopy(video)
        video.status = "deleted"
        video.renditions = []
        video.poster_uri = video.hls_uri = video.progress = video.speed = video.error = None
        return self._save(conn, video, before, now)

    def _announce(self, conn: Connection, kind: str, video: Video, event_id: str) -> int:
        data = contract.VideoRecord.model_validate(video.record(self.public_url, with_uris=True))
        outbox.enqueue(conn, new_event(kind, SOURCE, data.dump(), id=event_id, partitionkey=video.video_id))
        return 1

    def _existing(self, conn: Connection, video_id: str) -> Video:
        video = tables.load_video(conn, _video_id(video_id, "path.video_id"))
        if video is None:
            # Where an upload's status_url leads: its event may still be on its way here.
            raise NotFound(f"no video {video_id} (a video just uploaded is here once its event arrives, in moments)")
        if video.status == "deleted":
            raise NotFound(f"video {video_id} was deleted")
        return video

    def _load_or_new(self, conn: Connection, video_id: str, now: float) -> Video:
        return tables.load_video(conn, video_id) or Video(video_id, created_at=now)

    def _save(self, conn: Connection, video: Video, before: Video | None, now: float) -> Outcome:
        """Write the video if it changed (a new version); the outcome lists it then."""
        if video == before and video.version > 0:  # version 0: never saved
            return Outcome()
        tables.write_video(conn, video, now)
        return Outcome(videos=[video])

    def _prune(self, conn: Connection, now: float) -> None:
        self._applied_since_prune += 1
        if self._applied_since_prune >= PRUNE_EVERY:
            self._applied_since_prune = 0
            tables.forget_applied(conn, now - self.applied_retention_s)


def _retry_id(video_id: str, round: int) -> str:
    return f"{video_id}/retry/{round}"


def _attribute(event: Mapping[str, Any], name: str) -> str:
    value = event.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidInput(name, "a non-empty string (a CloudEvents attribute)")
    return value


def _video_id(value: Any, field: str) -> str:
    try:
        video_key(value, "x")
    except InvalidInput:
        raise InvalidInput(field, contract.VIDEO_ID_EXPECTED) from None
    assert isinstance(value, str)
    return value


def _event_time(event: Mapping[str, Any], default: float) -> float:
    value = event.get("time")
    if not isinstance(value, str):
        return default
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return default
