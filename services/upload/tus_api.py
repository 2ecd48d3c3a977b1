"""Resumable uploads over tus 1.0 (core, creation, termination, checksum, expiration) at `/uploads`.

    OPTIONS /uploads                  what this server speaks (Tus-Version, Tus-Extension, Tus-Max-Size)
    POST    /uploads                  Upload-Length + Upload-Metadata (filename, title, renditions) -> 201 Location
    HEAD    /uploads/{upload_id}      Upload-Offset: how much the server has
    PATCH   /uploads/{upload_id}      application/offset+octet-stream at Upload-Offset; the last byte submits it
    DELETE  /uploads/{upload_id}      terminate

The upload's id is its video id. Every answer carries `Tus-Resumable: 1.0.0`; refusals are
problem+json like the rest of the service (with tus' statuses where it has its own: 412, 460).
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from services.common.errors import CatTubeError
from services.common.openapi import problems
from services.common.problems import problem_response
from services.upload.api import SettingsDep
from services.upload.partials import Partial
from services.upload.resumable import Resumable
from services.upload.tus import (
    CHECKSUM_ALGORITHMS,
    EXTENSIONS,
    OFFSET_OCTET_STREAM,
    VERSION,
    VersionMismatch,
    require_offset_stream,
    require_version,
    upload_length,
    upload_offset,
)

log = logging.getLogger(__name__)

router = APIRouter(tags=["resumable uploads (tus)"])

# The PATCH body streams to disk under its own bound (Upload-Length - Upload-Offset), not the service's.
STREAMING_ROUTES = [("PATCH", "/uploads/[^/]+")]
# Headers a page on another origin sends and reads (CORS).
REQUEST_HEADERS = ["Tus-Resumable", "Upload-Length", "Upload-Metadata", "Upload-Offset", "Upload-Checksum"]
RESPONSE_HEADERS = [
    "Location",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Expires",
]


def _resumable(request: Request) -> Resumable:
    resumable: Resumable = request.app.state.resumable
    return resumable


ResumableDep = Annotated[Resumable, Depends(_resumable)]


def _header(name: str, schema: dict[str, Any], description: str, *, required: bool = True) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": required, "schema": schema, "description": description}


# `<algorithm> <base64 digest>`, the digest of the algorithm's size (20, 16 and 32 bytes).
CHECKSUM_PATTERN = r"^(sha1 [A-Za-z0-9+/]{27}=|md5 [A-Za-z0-9+/]{22}==|sha256 [A-Za-z0-9+/]{43}=)$"
TUS_RESUMABLE = _header("Tus-Resumable", {"type": "string", "enum": [VERSION]}, "The tus version (412 otherwise).")


def _documented(status: int, headers: dict[str, str], *refusals: int) -> dict[int | str, dict[str, Any]]:
    """`responses=`: the success with the headers it carries, and each refusal (problem+json)."""
    named = {name: {"schema": {"type": "string"}, "description": text} for name, text in headers.items()}
    return {status: {"description": "Done.", "headers": named}, **problems(*refusals)}


def _tus_headers(partial: Partial | None = None) -> dict[str, str]:
    headers = {"Tus-Resumable": VERSION, "Cache-Control": "no-store"}
    if partial is not None:
        headers["Upload-Offset"] = str(partial.offset)
        if not partial.complete:
            headers["Upload-Expires"] = email.utils.formatdate(partial.expires_at, usegmt=True)
    return headers


async def _answer(make: Callable[[], Awaitable[Response]]) -> Response:
    """The route's answer, or its refusal as problem+json with the tus headers a client looks for."""
    try:
        return await make()
    except CatTubeError as exc:
        headers = _tus_headers()
        if isinstance(exc, VersionMismatch):
            headers["Tus-Version"] = VERSION
        return problem_response(exc.status, exc.title, exc.detail, errors=exc.errors, headers=headers)


@router.options(
    "/uploads",
    status_code=204,
    responses=_documented(204, {"Tus-Version": "1.0.0", "Tus-Extension": "What is spoken."}),
)
async def tus_options(settings: SettingsDep) -> Response:
    """What this tus server speaks: its version, extensions, checksum algorithms and largest upload."""
    headers = {
        "Tus-Resumable": VERSION,
        "Tus-Version": VERSION,
        "Tus-Extension": ",".join(EXTENSIONS),
        "Tus-Max-Size": str(settings.max_upload_bytes),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
    }
    return Response(status_code=204, headers=headers)


@router.post(
    "/uploads",
    status_code=201,
    response_class=Response,
    responses=_documented(201, {"Location": "The upload's URL; it ends in its id."}, 400, 412, 413, 422),
    openapi_extra={
        "parameters": [
            TUS_RESUMABLE,
            _header("Upload-Length", {"type": "integer", "minimum": 1}, "The size of the whole file, in bytes."),
            _header(
                "Upload-Metadata",
                {"type": "string"},
                "Comma-separated `key base64(value)` pairs: `filename`, `title` (at most 200 characters), "
                "`renditions` (comma-separated names, e.g. 720p,360p).",
                required=False,
            ),
        ]
    },
)
async def create_upload(request: Request, resumable: ResumableDep, settings: SettingsDep) -> Response:
    """Create a resumable upload (tus creation); its title and renditions are checked before any byte is sent."""

    async def create() -> Response:
        require_version(request.headers)
        length = upload_length(request.headers, max_bytes=settings.max_upload_bytes)
        partial = await resumable.create(length, request.headers.get("upload-metadata"))
        base = (settings.upload_public_url or str(request.base_url)).rstrip("/")
        headers = {**_tus_headers(partial), "Location": f"{base}/uploads/{partial.upload_id}"}
        return Response(status_code=201, headers=headers)

    return await _answer(create)


@router.head(
    "/uploads/{upload_id}",
    responses=_documented(200, {"Upload-Offset": "Bytes received.", "Upload-Length": "Bytes in all."}, 404, 412),
    openapi_extra={"parameters": [TUS_RESUMABLE]},
)
async def upload_offset_of(upload_id: str, request: Request, resumable: ResumableDep) -> Response:
    """How much of an upload the server has (`Upload-Offset`): resume from there."""

    async def head() -> Response:
        require_version(request.headers)
        partial = await resumable.progress(upload_id)
        headers = {**_tus_headers(partial), "Upload-Length": str(partial.length)}
        if partial.metadata:
            headers["Upload-Metadata"] = partial.metadata
        return Response(status_code=200, headers=headers)

    return await _answer(head)


@router.patch(
    "/uploads/{upload_id}",
    status_code=204,
    response_class=Response,
    responses=_documented(204, {"Upload-Offset": "Bytes received."}, 400, 404, 409, 412, 413, 415, 422, 460, 507),
    openapi_extra={
        "parameters": [
            TUS_RESUMABLE,
            _header(
                "Upload-Offset", {"type": "integer", "minimum": 0}, "Where these bytes go (409 if not at the end)."
            ),
            _header(
                "Upload-Checksum",
                {"type": "string", "pattern": CHECKSUM_PATTERN},
                f"`<algorithm> <base64 digest>` of the body; algorithms: {', '.join(CHECKSUM_ALGORITHMS)}.",
                required=False,
            ),
        ],
        "requestBody": {
            "required": True,
            "content": {OFFSET_OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
        },
    },
)
async def append_to_upload(upload_id: str, request: Request, resumable: ResumableDep) -> Response:
    """Append bytes at `Upload-Offset`; the last byte sends the file through the same checks as `POST /videos`."""

    async def patch() -> Response:
        require_version(request.headers)
        require_offset_stream(request.headers)
        offset = upload_offset(request.headers)
        declared = request.headers.get("content-length")
        partial = await resumable.append(
            upload_id,
            offset,
            request.stream(),
            declared_bytes=int(declared) if declared and declared.isdigit() else None,
            checksum=request.headers.get("upload-checksum"),
        )
        return Response(status_code=204, headers=_tus_headers(partial))

    try:
        return await _answer(patch)
    except ClientDisconnect:
        log.info("resumable upload %s: the client left during a PATCH; the bytes it sent are kept", upload_id)
        return Response(status_code=400)  # nobody is left to read it


@router.delete(
    "/uploads/{upload_id}",
    status_code=204,
    response_class=Response,
    responses=_documented(204, {}, 404, 412),
    openapi_extra={"parameters": [TUS_RESUMABLE]},
)
async def terminate_upload(upload_id: str, request: Request, resumable: ResumableDep) -> Response:
    """Terminate an upload: its bytes are removed and its URL is gone (tus termination)."""

    async def delete() -> Response:
        require_version(request.headers)
        await resumable.terminate(upload_id)
        return Response(status_code=204, headers=_tus_headers())

    return await _answer(delete)
