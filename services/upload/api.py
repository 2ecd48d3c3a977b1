"""The upload service's HTTP API: `POST /videos` (multipart/form-data or a raw body), `GET /videos/{video_id}`."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from services.common.auth import Access, AccessRules
from services.common.contract import RENDITION_NAMES
from services.common.errors import NotFound
from services.common.redaction import redact
from services.upload.metadata import MAX_TITLE_CHARS, RENDITIONS_PATTERN
from services.upload.outbox import Outbox
from services.upload.settings import UploadSettings
from services.upload.uploads import Uploads

log = logging.getLogger(__name__)

router = APIRouter(tags=["videos"])

# What each route needs (services/common/auth.py); a route not named here needs admin.
ACCESS = AccessRules(
    [
        ("POST", "/videos", Access.USER),
        ("GET", "/videos/{video_id}", Access.USER),
        # Resumable uploads (services/upload/tus_api.py): the user's, as POST /videos; what tus is spoken, anyone's.
        ("POST", "/uploads", Access.USER),
        ("HEAD PATCH DELETE", "/uploads/{upload_id}", Access.USER),
        ("OPTIONS", "/uploads", Access.PUBLIC),
    ]
)


def _uploads(request: Request) -> Uploads:
    uploads: Uploads = request.app.state.uploads
    return uploads


def _outbox(request: Request) -> Outbox:
    outbox: Outbox = request.app.state.outbox
    return outbox


def _settings(request: Request) -> UploadSettings:
    settings: UploadSettings = request.app.state.settings
    return settings


UploadsDep = Annotated[Uploads, Depends(_uploads)]
OutboxDep = Annotated[Outbox, Depends(_outbox)]
SettingsDep = Annotated[UploadSettings, Depends(_settings)]


class Accepted(BaseModel):
    video_id: str
    status_url: str


_BINARY = {"schema": {"type": "string", "format": "binary"}}
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The master video."},
                        "title": {"type": "string", "maxLength": MAX_TITLE_CHARS},
                        "renditions": {
                            "type": "string",
                            "pattern": RENDITIONS_PATTERN,
                            "description": "Comma-separated, e.g. 720p,360p.",
                        },
                    },
                    "additionalProperties": False,
                }
            },
            "video/*": _BINARY,
            "application/octet-stream": _BINARY,
        },
    }
}
TITLE_DOC = f"At most {MAX_TITLE_CHARS} characters (control characters are removed); for raw bodies."
RENDITIONS_DOC = f"Comma-separated names out of {', '.join(RENDITION_NAMES)}, in the order wanted; for raw bodies."


@router.post(
    "/videos",
    status_code=202,
    response_model=Accepted,
    openapi_extra=REQUEST_BODY,
    responses={400: {}, 413: {}, 415: {}, 422: {}},
)
async def upload_video(
    request: Request,
    uploads: UploadsDep,
    settings: SettingsDep,
    title: Annotated[str | None, Query(description=TITLE_DOC)] = None,
    renditions: Annotated[
        str | None, Query(description=RENDITIONS_DOC, json_schema_extra={"pattern": RENDITIONS_PATTERN})
    ] = None,
) -> JSONResponse:
    """Upload a master video; 202 once it is stored, probed and its event committed to the outbox."""
    declared = request.headers.get("content-length")
    try:
        video_id = await uploads.receive(
            request.headers.get("content-type", ""),
            request.stream(),
            title=title,
            renditions=renditions,
            declared_bytes=int(declared) if declared and declared.isdigit() else None,
        )
    except ClientDisconnect:
        log.info("an upload was abandoned by its client before the body ended; nothing was kept")
        return JSONResponse({}, status_code=400)  # nobody is left to read it
    status_url = f"{_status_base(request, settings)}/videos/{video_id}"
    return JSONResponse(
        {"video_id": video_id, "status_url": status_url}, status_code=202, headers={"Location": status_url}
    )


def _status_base(request: Request, settings: UploadSettings) -> str:
    """Where a person follows a video: the store's record when its address is known, else this service."""
    if settings.store_public_url:
        return settings.store_public_url.rstrip("/")
    return (settings.upload_public_url or str(request.base_url)).rstrip("/")


@router.get("/videos/{video_id}", responses={404: {}})
async def get_video(video_id: str, outbox: OutboxDep, settings: SettingsDep) -> dict[str, Any]:
    """What the upload service knows of an upload: title, renditions, master, probe, and its event's state.

    Only the upload: the video's status, renditions and deletion are the store's (`status_url` leads there
    when CATTUBE_STORE_PUBLIC_URL is set).
    """
    record = await outbox.get(video_id)
    if record is None:
        raise NotFound(f"no upload with video_id {video_id!r}")
    return _public(record, settings)


def _public(record: dict[str, Any], settings: UploadSettings) -> dict[str, Any]:
    """The record without the bucket URI of the master or any server path (the event keeps the URI)."""
    master = {key: value for key, value in record.get("master", {}).items() if key != "uri"}
    event = dict(record.get("event", {}))
    if isinstance(event.get("error"), str):
        event["error"] = redact(event["error"], *settings.hidden_roots)
    shown = {**record, "master": master, "event": event}
    if settings.store_public_url:
        shown["store_url"] = f"{settings.store_public_url.rstrip('/')}/videos/{record['video_id']}"
    return shown
