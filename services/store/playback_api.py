"""The store's playback routes: renditions, posters and HLS packages from the bucket, with HTTP ranges and
validators; with CATTUBE_PLAYBACK=redirect, MP4 renditions and posters answer 307 to a presigned URL.

Access to these routes is in the store's `ACCESS` table (services/store/api.py): they are open to read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse

from services.common.blobs import BlobStore, check_key
from services.common.contract import HLS_FILE_PATTERN, HLS_MASTER
from services.common.errors import InvalidInput, NotFound, Unavailable
from services.common.problems import problem_response
from services.store.api import BlobsDep, CatalogDep, MetricsDep, SettingsDep, VideoId
from services.store.catalog import Catalog
from services.store.metrics import StoreMetrics
from services.store.playback import (
    RangeNotSatisfiable,
    content_type_of,
    etag_of,
    http_date,
    not_modified,
    parse_range,
    range_applies,
)
from services.store.settings import StoreSettings

router = APIRouter()

RENDITION = r"^[0-9]{3,4}p$"
HLS_VERSION = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Segments never change under their URL (each run of a job packages into a version of its own), so browsers and
# CDNs may keep them; playlists are tiny and re-read often, so they get a short life all the same.
IMMUTABLE = "public, max-age=31536000, immutable"
PLAYLIST_CACHE = "public, max-age=60"

RenditionName = Annotated[str, Path(pattern=RENDITION, description="A rendition name, such as 720p.")]
HlsVersion = Annotated[
    str, Path(pattern=HLS_VERSION, description="The HLS package's version, as the record's `hls_url` names it.")
]
HlsFile = Annotated[
    str, Path(pattern=HLS_FILE_PATTERN, description="A rung's media playlist, init segment or media segment.")
]


# Documented, though only CATTUBE_PLAYBACK=redirect answers it.
REDIRECTED: dict[int | str, dict[str, Any]] = {
    307: {"description": "CATTUBE_PLAYBACK=redirect: `Location` is a short-lived presigned URL of the object"}
}
HLS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file's bytes (or the range asked for, 206)",
        "content": {media: {} for media in ("application/vnd.apple.mpegurl", "video/mp4", "video/iso.segment")},
    }
}


@router.api_route(
    "/videos/{video_id}/renditions/{name}", methods=["GET", "HEAD"], tags=["playback"], responses=REDIRECTED
)
async def get_rendition(
    request: Request,
    video_id: VideoId,
    name: RenditionName,
    catalog: CatalogDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    """A rendition's bytes (video/mp4), with HTTP ranges (206), ETag and Last-Modified; or, with
    CATTUBE_PLAYBACK=redirect, a 307 to a short-lived presigned URL of the object in the bucket."""
    video = await catalog.get(video_id)
    rendition = video.rendition(name)
    if rendition is None:
        raise NotFound(f"video {video_id} has no rendition {name} (it is {video.status})")
    what = f"rendition {name} of video {video_id}"
    return await _serve_blob(request, blobs, settings, metrics, rendition.uri, what)


@router.api_route("/videos/{video_id}/poster", methods=["GET", "HEAD"], tags=["playback"], responses=REDIRECTED)
async def get_poster(
    request: Request,
    video_id: VideoId,
    catalog: CatalogDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    """The video's poster image (image/jpeg), with the same caching headers as a rendition."""
    video = await catalog.get(video_id)
    if video.poster_uri is None:
        raise NotFound(f"video {video_id} has no poster (it is {video.status})")
    return await _serve_blob(request, blobs, settings, metrics, video.poster_uri, f"the poster of video {video_id}")


@router.api_route(
    "/videos/{video_id}/hls/{version}/master.m3u8", methods=["GET", "HEAD"], tags=["playback"], responses=HLS_RESPONSES
)
async def get_hls_master(
    request: Request,
    video_id: VideoId,
    version: HlsVersion,
    catalog: CatalogDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    """The HLS master playlist (application/vnd.apple.mpegurl): one variant per rendition, relative links."""
    key = await _hls_key(catalog, blobs, video_id, version, HLS_MASTER)
    what = f"the HLS playlist of video {video_id}"
    return await _serve_key(request, blobs, settings, metrics, key, what, cache_control=PLAYLIST_CACHE)


@router.api_route(
    "/videos/{video_id}/hls/{version}/{name}/{file}",
    methods=["GET", "HEAD"],
    tags=["playback"],
    responses=HLS_RESPONSES,
)
async def get_hls_file(
    request: Request,
    video_id: VideoId,
    version: HlsVersion,
    name: RenditionName,
    file: HlsFile,
    catalog: CatalogDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    """A rendition's HLS media playlist, init segment (video/mp4) or media segment (video/iso.segment, immutable:
    cached for a year), with HTTP ranges; always served from here, also with CATTUBE_PLAYBACK=redirect."""
    key = await _hls_key(catalog, blobs, video_id, version, name, file)
    what = f"HLS {name}/{file} of video {video_id}"
    cache_control = PLAYLIST_CACHE if file.endswith(".m3u8") else IMMUTABLE
    # Chromium's native HLS refuses segments redirected to another origin ("no supported sources", seen in
    # tests/e2e/test_s3_page.py), so the package never leaves for the bucket; MP4 rungs and posters may.
    return await _serve_key(request, blobs, settings, metrics, key, what, cache_control=cache_control, redirect=False)


async def _hls_key(catalog: Catalog, blobs: BlobStore, video_id: str, version: str, *names: str) -> str:
    """The bucket key of one file of the video's HLS package; any version still in the bucket is served, so a
    player halfway through a version made by an earlier run of the job plays on."""
    video = await catalog.get(video_id)
    if video.hls_uri is None:
        raise NotFound(f"video {video_id} has no HLS playlist (it is {video.status}, or older than HLS here)")
    try:
        master_key = blobs.key_of(video.hls_uri)
    except InvalidInput:
        raise NotFound(f"the HLS playlist of video {video_id} is not in this store's bucket") from None
    folder = master_key.rsplit("/", 2)[0]  # videos/{id}/hls
    return check_key("/".join((folder, version, *names)))


async def _serve_blob(
    request: Request, blobs: BlobStore, settings: StoreSettings, metrics: StoreMetrics, uri: str, what: str
) -> Response:
    try:
        key = blobs.key_of(uri)
    except InvalidInput:
        raise NotFound(f"{what} is not in this store's bucket") from None
    # Renditions and posters are rewritten in place when a job runs twice: revalidate (cheap, a 304).
    return await _serve_key(request, blobs, settings, metrics, key, what, cache_control="no-cache")


async def _serve_key(
    request: Request,
    blobs: BlobStore,
    settings: StoreSettings,
    metrics: StoreMetrics,
    key: str,
    what: str,
    *,
    cache_control: str,
    redirect: bool = True,
) -> Response:
    # A playlist is always served from here: its links are relative, and resolved against a presigned URL they
    # would name unsigned objects in the bucket.
    if redirect and settings.playback == "redirect" and not key.endswith(".m3u8"):
        return await _redirect(request, blobs, settings, key)
    info = await blobs.stat(key)
    if info is None:
        raise NotFound(f"{what} is missing from the bucket")
    size = info.size_bytes
    etag = etag_of(info)
    headers = {
        "ETag": etag,
        "Last-Modified": http_date(info.modified_at),
        "Accept-Ranges": "bytes",
        "Cache-Control": cache_control,
    }
    if not_modified(request.headers, etag, info.modified_at):
        return Response(status_code=304, headers=headers)
    start, end, status = 0, size, 200
    if range_applies(request.headers, etag, info.modified_at):
        try:
            byte_range = parse_range(request.headers.get("range"), size)
        except RangeNotSatisfiable as exc:
            return problem_response(
                416,
                "Range not satisfiable",
                f"header.Range: {exc}",
                headers={**headers, "Content-Range": f"bytes */{size}"},
            )
        if byte_range is not None:
            start, end, status = byte_range.start, byte_range.end, 206
            headers["Content-Range"] = byte_range.content_range(size)
    headers["Content-Length"] = str(end - start)
    media_type = content_type_of(key)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in blobs.read(key, start, end):
            metrics.bytes_served.inc(len(chunk))
            yield chunk

    return StreamingResponse(body(), status_code=status, headers=headers, media_type=media_type)


async def _redirect(request: Request, blobs: BlobStore, settings: StoreSettings, key: str) -> Response:
    # Signed for this method (a presigned GET refuses HEAD); the bucket answers ranges and validators itself.
    # No stat first: the catalog says the object exists, and the store stays out of the byte path.
    url = await blobs.presigned_url(key, request.method, settings.playback_url_expiry_s)
    if url is None:  # the settings refuse redirect without an s3:// bucket; this is a store without URLs
        raise Unavailable(f"the blob store {blobs!r} cannot give URLs to redirect to (CATTUBE_PLAYBACK=redirect)")
    # Not cached: the URL expires, and the next request should get a fresh one.
    return Response(status_code=307, headers={"Location": url, "Cache-Control": "no-store"})
