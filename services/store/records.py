"""What the catalog holds (videos, renditions, autoscaler changes) and how each is shown to clients.

`Video.record(base_url)` is the shape of the store's events (with the bucket URIs other services
need); `Video.public_record(base_url, ...)` is what clients read (`GET /videos/{id}`, the list, the
live stream): no bucket URI or server path, even inside an error message, and a deleted video is a
bare tombstone for readers without the token. URLs are built from the store's configured public
URL, never from the request's `Host` header (which any client can set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.common.redaction import redact
from services.common.timestamps import iso_utc

STATUSES = ("uploaded", "processing", "failed", "ready", "deleted")
"""In the only order a video may move through them (`failed` and `ready` are both outcomes; `ready` wins)."""


def iso(at: float | None) -> str | None:
    return None if at is None else iso_utc(at)


@dataclass
class Rendition:
    name: str
    uri: str
    width: int | None = None
    height: int | None = None
    bitrate: int | None = None
    size_bytes: int | None = None
    duration_s: float | None = None


@dataclass
class Video:
    video_id: str
    status: str = "uploaded"
    title: str | None = None
    description: str | None = None
    master: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    requested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    renditions: list[Rendition] = field(default_factory=list)
    poster_uri: str | None = None
    hls_uri: str | None = None
    """The HLS master playlist in the bucket (`.../videos/{id}/hls/{version}/master.m3u8`); None before HLS."""
    error: str | None = None
    last_error: str | None = None
    input_rejected: bool = False
    """It failed because its master cannot become what was asked (`transcode.failed`'s `input_rejected`)."""
    progress: float | None = None
    speed: float | None = None
    attempt: int | None = None
    worker: str | None = None
    elapsed_s: float | None = None
    round: int = 0
    """0 for the upload, then one more for each retry a person asked for."""
    edits: int = 0
    """How many times a person changed the title or description (the `revision` of `cattube.video.updated`)."""
    created_at: float = 0.0
    updated_at: float = 0.0
    version: int = 0
    """Grows with every change of any video: a client keeps the copy with the highest one."""

    def rendition(self, name: str) -> Rendition | None:
        return next((r for r in self.renditions if r.name == name), None)

    def blob_uris(self) -> list[str]:
        uris = [self.master.get("uri") if self.master else None, *(r.uri for r in self.renditions), self.poster_uri]
        return list(dict.fromkeys(uri for uri in uris if isinstance(uri, str)))

    @property
    def retryable(self) -> bool:
        """What `POST /videos/{id}/retry` accepts: a failed video whose master and probe the catalog knows, and
        whose master was not rejected (running the same request again cannot change that verdict)."""
        master_uri = self.master.get("uri") if self.master else None
        known = isinstance(master_uri, str) and bool(self.probe) and bool(self.requested)
        return self.status == "failed" and known and not self.input_rejected

    def public_record(
        self, base_url: str, *, hidden_roots: tuple[str, ...] = (), tombstone: bool = False
    ) -> dict[str, Any]:
        """The video as a client reads it: no internal locations; `tombstone` strips a deleted video to its id."""
        if tombstone and self.status == "deleted":
            return Video(self.video_id, status="deleted", version=self.version).record(base_url) | {
                "created_at": None,
                "updated_at": None,
            }
        record = self.record(base_url)
        for name in ("error", "last_error"):
            if isinstance(record[name], str):
                record[name] = redact(record[name], *hidden_roots)
        return record

    def record(self, base_url: str, *, with_uris: bool = False) -> dict[str, Any]:
        """The video as clients see it; `with_uris` adds the bucket URIs (for the events other services read)."""
        own = f"{base_url.rstrip('/')}/videos/{self.video_id}"
        probe = self.probe or {}
        renditions = []
        for r in self.renditions:
            item: dict[str, Any] = {
                "name": r.name,
                "url": f"{own}/renditions/{r.name}",
                "width": r.width,
                "height": r.height,
                "size_bytes": r.size_bytes,
                "bitrate": r.bitrate,
                "duration_s": r.duration_s,
            }
            if with_uris:
                item["uri"] = r.uri
            renditions.append(item)
        record: dict[str, Any] = {
            "video_id": self.video_id,
            "title": self.title,
            "description": self.description,
            "status": self.status,
            "watch_url": f"{base_url.rstrip('/')}/watch/{self.video_id}",
            "renditions": renditions,
            "poster_url": f"{own}/poster" if self.poster_uri else None,
            "hls_url": self.hls_url(own),
            "error": self.error,
            "progress": self.progress,
            "speed": self.speed,
            "requested": self.requested,
            "skipped": self.skipped,
            "duration_s": probe.get("duration_s"),
            "width": probe.get("width"),
            "height": probe.get("height"),
            "attempt": self.attempt,
            "retries": self.round,
            "retryable": self.retryable,
            "last_error": self.last_error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "version": self.version,
        }
        if with_uris:
            record["master"] = self.master
            record["poster_uri"] = self.poster_uri
            record["hls_uri"] = self.hls_uri
        return record

    def hls_url(self, own: str) -> str | None:
        """Where the store serves the master playlist: `{own}/hls/{version}/master.m3u8`, the version the bucket's."""
        if self.hls_uri is None:
            return None
        version, name = self.hls_uri.rsplit("/", 2)[-2:]
        return f"{own}/hls/{version}/{name}"


@dataclass(frozen=True)
class ScalingPoint:
    """One `cattube.processing.scaled`: `instance`'s workers went from `from_` to `to` at `at`.

    `instance` is "" for events from before processing instances had names (one unnamed instance);
    `fleet` is the workers over every instance once this change was made (`services.store.fleet`).
    `backlog` and `in_flight` are the queue's, the same whichever instance reports them.
    """

    at: float
    from_: int
    to: int
    backlog: int
    in_flight: int
    reason: str
    instance: str = ""
    fleet: int = 0
    seq: int = field(default=0, compare=False)
    """The catalog's row: tells apart two changes reported at the same time."""

    def record(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "instance": self.instance or None,
            "from": self.from_,
            "to": self.to,
            "fleet": self.fleet,
            "backlog": self.backlog,
            "in_flight": self.in_flight,
            "reason": self.reason,
        }
