"""The store's HTTP API: the catalog, the live stream, and the pages that use them (playback with HTTP
ranges is in services/store/playback_api.py; who may call what, for both, is `ACCESS` here).

Reads are open (a page and a player need them without a token). Editing, retry and delete need the user
token (`Authorization: Bearer <CATTUBE_USER_TOKEN>`) when tokens are set; the page asks for it (or
takes it from its address, `/#token=...`, as `cattube up` prints it) and keeps it in the browser.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from services.common.auth import Access, AccessRules, granted_access
from services.common.blobs import BlobStore
from services.common.errors import NotFound
from services.common.openapi import problems
from services.common.text import MAX_DESCRIPTION_CHARS, MAX_TITLE_CHARS
from services.store.catalog import Catalog
from services.store.feed import Feed
from services.store.live import Change, Live
from services.store.metrics import StoreMetrics
from services.store.pages import bucket_origin
from services.store.records import Video
from services.store.settings import StoreSettings
from services.store.tables import CURSOR_PATTERN

router = APIRouter()

# What each route needs (services/common/auth.py); a route not named here needs admin. The catalog and
# playback are public; changing a video takes the user token; the inbox checks its own signature.
ACCESS = AccessRules(
    [
        ("GET HEAD", "/", Access.PUBLIC),
        ("GET HEAD", "/watch/{video_id}", Access.PUBLIC),
        ("GET HEAD", "/static/{path:path}", Access.PUBLIC),
        ("GET", "/videos", Access.PUBLIC),
        ("GET", "/videos/{video_id}", Access.PUBLIC),
        ("PATCH", "/videos/{video_id}", Access.USER),
        ("POST", "/videos/{video_id}/retry", Access.USER),
        ("DELETE", "/videos/{video_id}", Access.USER),
        ("GET HEAD", "/videos/{video_id}/renditions/{name}", Access.PUBLIC),
        ("GET HEAD", "/videos/{video_id}/poster", Access.PUBLIC),
        ("GET HEAD", "/videos/{video_id}/hls/{version}/master.m3u8", Access.PUBLIC),
        ("GET HEAD", "/videos/{video_id}/hls/{version}/{name}/{file}", Access.PUBLIC),
        ("POST", "/inbox", Access.PUBLIC),
        ("GET", "/events", Access.PUBLIC),
        ("GET", "/autoscaler/history", Access.PUBLIC),
    ]
)

VIDEO_ID = r"^[A-Za-z0-9_-]{1,64}$"
# Timestamps are strings from `services.common.timestamps` (milliseconds, `Z`): a `datetime` field would be
# re-serialized by pydantic with microseconds.
DATE_TIME: dict[str, Any] = {"format": "date-time"}


def _state(name: str) -> Any:
    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return Depends(get)


CatalogDep = Annotated[Catalog, _state("catalog")]
BlobsDep = Annotated[BlobStore, _state("blobs")]
LiveDep = Annotated[Live, _state("live")]
FeedDep = Annotated[Feed, _state("feed")]
SettingsDep = Annotated[StoreSettings, _state("settings")]
MetricsDep = Annotated[StoreMetrics, _state("metrics")]
VideoId = Annotated[str, Path(pattern=VIDEO_ID, description="The id the upload service gave the video.")]


async def delivered_event(request: Request, feed: FeedDep) -> dict[str, Any]:
    """The CloudEvent of a push delivery, its Standard Webhooks signature verified (401 otherwise)."""
    return await feed.receiver(request)


def may_see_deleted(request: Request, settings: StoreSettings) -> bool:
    """Whether the request carries a token (or none is set): anyone else sees deleted videos as bare ids."""
    return not settings.auth_enabled or granted_access(request.scope) is not None


# -- shapes (they draw /docs) ---------------------------------------------------------------------


class RenditionOut(BaseModel):
    name: str
    url: str
    width: int | None
    height: int | None
    size_bytes: int | None
    bitrate: int | None = None
    duration_s: float | None = None


class VideoOut(BaseModel):
    video_id: str
    title: str | None
    description: str | None = Field(None, description="What a person wrote about the video (line breaks kept).")
    status: Literal["uploaded", "processing", "failed", "ready", "deleted"]
    watch_url: str = Field(description="The video's page, to share.")
    renditions: list[RenditionOut]
    poster_url: str | None
    hls_url: str | None = Field(
        None, description="The HLS master playlist (adaptive streaming); null while processing and for older videos."
    )
    error: str | None = Field(description="Why the video failed, in words a person can act on.")
    progress: float | None = Field(description="Percent transcoded, while processing (100 once ready).")
    speed: float | None = Field(None, description="Transcoding speed, times real time.")
    requested: list[str] = Field(description="Renditions asked for at upload.")
    skipped: list[str] = Field(description="Requested renditions larger than the source, not made.")
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    attempt: int | None = Field(None, description="The transcoding attempt of the current round.")
    retries: int = Field(0, description="How many times a person asked to run the video again.")
    retryable: bool = Field(
        False,
        description="POST /videos/{id}/retry would accept it (failed, master known and not rejected as unusable).",
    )
    last_error: str | None = Field(None, description="The latest failure of an attempt, while it is retried.")
    created_at: str | None = Field(json_schema_extra=DATE_TIME)
    updated_at: str | None = Field(json_schema_extra=DATE_TIME)
    version: int = Field(description="Grows with every change: keep the copy with the highest version.")


class VideoEdit(BaseModel):
    """What a person may change about a video; fields left out stay as they are (JSON Merge Patch, RFC 7396)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    # Not null (refused below), so the schema leaves null out.
    title: str | SkipJsonSchema[None] = Field(
        None,
        min_length=1,
        max_length=MAX_TITLE_CHARS,
        description="Control characters are removed and spaces collapsed; something must be left.",
    )
    description: str | None = Field(
        None,
        max_length=MAX_DESCRIPTION_CHARS,
        description="Line breaks are kept, other control characters removed; empty or null removes it.",
    )

    @field_validator("title", mode="before")
    @classmethod
    def _title_stays(cls, value: Any) -> Any:
        # Only an explicit null gets here (a left-out field keeps its default): a video always has a title.
        if value is None:
            raise PydanticCustomError("title_null", "a string: a video keeps a title (leave it out to keep it)")
        return value

    @model_validator(mode="after")
    def _something_to_change(self) -> VideoEdit:
        if not self.model_fields_set:
            raise PydanticCustomError("empty_edit", "an object with title or description (nothing to change)")
        return self


class VideoPage(BaseModel):
    items: list[VideoOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last one.")


class ScalingOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    at: str = Field(json_schema_extra=DATE_TIME)
    instance: str | None = Field(
        description="The processing instance that scaled (CATTUBE_INSTANCE); null for one from before instances "
        "had names (all such changes count as one unnamed instance)."
    )
    from_: int = Field(alias="from", description="The instance's workers before the change.")
    to: int = Field(description="The instance's workers after the change.")
    fleet: int = Field(description="Workers over every processing instance after the change.")
    backlog: int = Field(description="Jobs waiting in the transcode queue (the queue's, whichever instance reports).")
    in_flight: int = Field(description="Jobs received by any instance and not yet settled.")
    reason: str


class InstanceOut(BaseModel):
    instance: str | None = Field(description="The instance's name; null for the unnamed one.")
    workers: int = Field(description="Its workers at the end of the history.")
    at: str = Field(json_schema_extra=DATE_TIME, description="When it last changed.")


class HistoryOut(BaseModel):
    items: list[ScalingOut] = Field(description="Changes of each instance's worker count, oldest first.")
    instances: list[InstanceOut] = Field(
        description="By name: every instance with a change in `items`, and any other still running workers."
    )
    fleet: int = Field(description="Workers over every processing instance now.")


def _shown(video: Video, settings: StoreSettings, *, tombstone: bool = False) -> dict[str, Any]:
    # Links from the configured public URL: the Host header is the client's to choose.
    return video.public_record(settings.public_base_url, hidden_roots=settings.hidden_roots, tombstone=tombstone)


# -- the catalog ----------------------------------------------------------------------------------


@router.get("/videos", response_model=VideoPage, tags=["videos"])
async def list_videos(
    request: Request,
    catalog: CatalogDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Query(description="The last page's `next_cursor`.", json_schema_extra={"pattern": CURSOR_PATTERN})
    ] = None,
    status: Literal["uploaded", "processing", "failed", "ready", "deleted"] | None = None,
) -> dict[str, Any]:
    """Videos, newest first; deleted ones only with `status=deleted` (bare ids, unless the token is given)."""
    page = await catalog.page(limit=limit, cursor=cursor, status=status)
    tombstone = not may_see_deleted(request, settings)
    items = [_shown(video, settings, tombstone=tombstone) for video in page.items]
    return {"items": items, "next_cursor": page.next_cursor}


@router.get("/videos/{video_id}", response_model=VideoOut, tags=["videos"])
async def get_video(video_id: VideoId, catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
    """One video: status, progress, renditions to play; 404 once deleted (or not heard of yet)."""
    return _shown(await catalog.get(video_id), settings)


# JSON Merge Patch's own media type is taken as well as plain JSON (FastAPI reads any `+json` body).
MERGE_PATCH: dict[str, Any] = {
    "requestBody": {"content": {"application/merge-patch+json": {"schema": {"$ref": "#/components/schemas/VideoEdit"}}}}
}


@router.patch("/videos/{video_id}", response_model=VideoOut, tags=["videos"], openapi_extra=MERGE_PATCH)
async def edit_video(video_id: VideoId, edit: VideoEdit, catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
    """Change the title or description (publishes `cattube.video.updated`); 404 once deleted."""
    # Only the fields sent: a left-out description stays, a null one is removed (an empty string).
    description = (edit.description or "") if "description" in edit.model_fields_set else None
    return _shown(await catalog.edit(video_id, title=edit.title, description=description), settings)


@router.post(
    "/videos/{video_id}/retry",
    status_code=202,
    response_model=VideoOut,
    tags=["videos"],
)
async def retry_video(video_id: VideoId, catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
    """Run a failed video again (publishes `cattube.video.retry-requested`); 409 unless its record is `retryable`."""
    return _shown(await catalog.request_retry(video_id), settings)


@router.delete(
    "/videos/{video_id}",
    status_code=202,
    response_model=VideoOut,
    tags=["videos"],
)
async def delete_video(video_id: VideoId, catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
    """Delete a video (publishes `cattube.video.deleted`; its blobs are removed by that event's consumer)."""
    return _shown(await catalog.delete(video_id), settings)


# -- events in and out ----------------------------------------------------------------------------


WEBHOOK_HEADERS: dict[str, Any] = {
    "parameters": [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}, "description": doc}
        for name, doc in (
            ("webhook-id", "Standard Webhooks: the delivery's id"),
            ("webhook-timestamp", "Standard Webhooks: seconds since the epoch, within 5 minutes of now"),
            ("webhook-signature", "Standard Webhooks: v1,<base64 HMAC-SHA256> with the subscription's secret"),
        )
    ]
}


@router.post("/inbox", status_code=204, tags=["events"], responses=problems(401), openapi_extra=WEBHOOK_HEADERS)
async def inbox(
    event: Annotated[dict[str, Any], Depends(delivered_event)], catalog: CatalogDep, metrics: MetricsDep
) -> Response:
    """Where the router pushes the store's subscription (signed; 401 otherwise). 2xx once applied."""
    outcome = await catalog.apply(event)
    metrics.delivered(str(event.get("type")), outcome)
    return Response(status_code=204)


@router.get("/events", response_class=StreamingResponse, tags=["events"])
async def live_events(request: Request, live: LiveDep, settings: SettingsDep) -> StreamingResponse:
    """Server-sent events for the page: `ready` once listening, then `video` and `scaled` changes as they happen."""

    async def stream() -> AsyncIterator[str]:
        async with live.listen() as changes:
            # Sent once listening: a page loads the lists after this, so no change falls in between.
            yield "retry: 2000\nevent: ready\ndata: {}\n\n"
            while True:
                try:
                    async with asyncio.timeout(settings.live_heartbeat_s):
                        change = await changes.get()
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if change is None:
                    return
                yield _sse(change, settings)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _sse(change: Change, settings: StoreSettings) -> str:
    if change.video is not None:
        # The stream is open to anyone: a deletion is announced by id alone.
        payload = _shown(change.video, settings, tombstone=True)
    else:
        assert change.point is not None
        payload = change.point.record()
    return f"event: {change.kind}\ndata: {json.dumps(payload)}\n\n"


@router.get("/autoscaler/history", response_model=HistoryOut, tags=["events"])
async def autoscaler_history(
    catalog: CatalogDep, limit: Annotated[int, Query(ge=1, le=100_000)] = 500
) -> dict[str, Any]:
    """Every processing instance's autoscaler changes (`cattube.processing.scaled`), oldest first, with the fleet."""
    return (await catalog.scaling_history(limit)).record()


# -- the page -------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def home_page(request: Request, settings: SettingsDep, blobs: BlobsDep) -> HTMLResponse:
    """The home page: upload, the grid of posters with live status, the autoscaler chart."""
    html, headers = request.app.state.pages.home(settings, await bucket_origin(settings, blobs))
    return HTMLResponse(html, headers=headers)


@router.get("/watch/{video_id}", response_class=HTMLResponse, include_in_schema=False)
async def watch_page(
    request: Request, video_id: VideoId, catalog: CatalogDep, settings: SettingsDep, blobs: BlobsDep
) -> HTMLResponse:
    """One video's page: player, title, description, downloads, live status; 404 (still a page that follows
    the live stream) while the store has not heard of the video, or once it is deleted."""
    try:
        record: dict[str, Any] | None = _shown(await catalog.get(video_id), settings)
    except NotFound:
        record = None
    html, headers = request.app.state.pages.watch(settings, video_id, record, await bucket_origin(settings, blobs))
    return HTMLResponse(html, status_code=200 if record else 404, headers=headers)
