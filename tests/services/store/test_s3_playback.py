"""Playback from an S3 bucket (the session's SeaweedFS, signatures checked): the same ranges and validators as
from `file://`, or with CATTUBE_PLAYBACK=redirect a 307 to a presigned URL; a missing bucket named by /readyz."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest
from obstore.store import S3Store
from pydantic import ValidationError

from services.common.blob_check import BlobStoreCheck
from services.store.settings import StoreSettings
from tests.s3 import CLIENT, S3Server
from tests.services.store.test_api import JPEG, MP4, ready_video
from tests.services.store.test_hls import IMMUTABLE, SEGMENT, hls_video
from tests.services.store.test_hls import MASTER as HLS_MASTER
from tests.services.store.test_hls import MEDIA as HLS_MEDIA
from tests.services.store.test_hls import VERSION as HLS_VERSION


async def test_renditions_and_posters_play_from_s3_with_ranges_and_validators(
    make_store: Callable[..., Any], s3: S3Server, s3_url: str
) -> None:
    async with make_store(bucket=s3.bucket(s3_url), blob_url=s3_url) as store:
        await ready_video(store)
        url = "/videos/v1/renditions/720p"
        whole = await store.api.get(url)
        assert whole.status_code == 200 and whole.content == MP4, whole.text
        assert whole.headers["content-type"] == "video/mp4" and whole.headers["accept-ranges"] == "bytes"
        part = await store.api.get(url, headers={"Range": "bytes=100-355"})
        assert part.status_code == 206 and part.content == MP4[100:356]
        assert part.headers["content-range"] == f"bytes 100-355/{len(MP4)}"
        tail = await store.api.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == MP4[-10:]
        unchanged = await store.api.get(url, headers={"If-None-Match": whole.headers["etag"]})
        assert unchanged.status_code == 304 and unchanged.content == b""
        head = await store.api.head(url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(MP4)) and head.headers["etag"] == whole.headers["etag"]
        poster = await store.api.get("/videos/v1/poster")
        assert poster.status_code == 200 and poster.content == JPEG and poster.headers["content-type"] == "image/jpeg"


async def test_a_missing_bucket_is_named_by_readyz_and_the_store_recovers_once_it_exists(
    make_store: Callable[..., Any], s3: S3Server, s3_env: None
) -> None:
    missing = f"cattube-test-{secrets.token_hex(6)}"
    async with make_store(blob_url=f"s3://{missing}/media") as store:
        check: BlobStoreCheck = store.app.state.blob_check
        await asyncio.wait_for(check.answered.wait(), timeout=30)
        ready = await store.api.get("/readyz")
        assert ready.status_code == 503 and ready.headers["content-type"] == "application/problem+json"
        assert f"the bucket '{missing}' does not exist" in ready.json()["detail"], ready.text
        assert (await store.api.get("/healthz")).status_code == 200  # up, not crashed
        admin = S3Store(missing, config=s3.config(s3.admin), client_options=CLIENT)  # type: ignore[arg-type]
        await obstore.put_async(admin, ".created", b"")  # an operator creates the bucket
        await obstore.delete_async(admin, ".created")
        await asyncio.wait_for(check.passed.wait(), timeout=30)  # retried in the background, no restart
        assert (await store.api.get("/readyz")).status_code == 200


async def test_redirect_mode_sends_players_to_a_presigned_url_that_serves_bytes_and_ranges(
    make_store: Callable[..., Any], s3: S3Server, s3_url: str
) -> None:
    async with make_store(bucket=s3.bucket(s3_url), blob_url=s3_url, playback="redirect") as store:
        await ready_video(store)
        moved = await store.api.get("/videos/v1/renditions/720p", headers={"Range": "bytes=0-9"})
        assert moved.status_code == 307 and moved.headers["cache-control"] == "no-store" and moved.content == b""
        location = moved.headers["location"]
        assert location.startswith(f"{s3.endpoint}/") and "X-Amz-Signature=" in location
        async with httpx.AsyncClient() as browser:  # no credentials: the URL's signature is the permission
            whole = await browser.get(location)
            assert whole.status_code == 200 and whole.content == MP4
            part = await browser.get(location, headers={"Range": "bytes=100-355"})
            assert part.status_code == 206 and part.content == MP4[100:356]
            head_moved = await store.api.head("/videos/v1/renditions/720p")
            assert head_moved.status_code == 307
            head = await browser.head(head_moved.headers["location"])
            assert head.status_code == 200 and head.headers["content-length"] == str(len(MP4))
            poster = await browser.get((await store.api.get("/videos/v1/poster")).headers["location"])
            assert poster.status_code == 200 and poster.content == JPEG
            tampered = await browser.get(location.replace("720p.mp4", "360p.mp4"))
            assert tampered.status_code == 403  # signed for one object only
        csp = (await store.api.get("/")).headers["content-security-policy"]
        media_src = next(part for part in csp.split(";") if part.strip().startswith("media-src"))
        assert s3.endpoint in media_src.split(), csp


def test_redirect_mode_with_a_file_bucket_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="CATTUBE_PLAYBACK=redirect needs an s3:// CATTUBE_BLOB_URL"):
        StoreSettings(data_dir=tmp_path, playback="redirect")
    with pytest.raises(ValidationError, match="playback_url_expiry_s"):
        StoreSettings(data_dir=tmp_path, blob_url="s3://cattube/media", playback="redirect", playback_url_expiry_s=0)


async def test_hls_plays_from_s3_and_is_served_by_the_store_in_redirect_mode_too(
    make_store: Callable[..., Any], s3: S3Server, s3_url: str
) -> None:
    base = f"/videos/v1/hls/{HLS_VERSION}"
    async with make_store(bucket=s3.bucket(s3_url), blob_url=s3_url) as store:
        await hls_video(store)
        master = await store.api.get(f"{base}/master.m3u8")
        assert master.status_code == 200 and master.content == HLS_MASTER
        assert master.headers["content-type"] == "application/vnd.apple.mpegurl"
        part = await store.api.get(f"{base}/720p/seg-00000.m4s", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == SEGMENT[10:20]
        assert part.headers["content-type"] == "video/iso.segment" and part.headers["cache-control"] == IMMUTABLE
    async with make_store(bucket=s3.bucket(s3_url), blob_url=s3_url, playback="redirect") as store:
        # Resolved against a presigned URL, a playlist's relative links would name unsigned objects: served here.
        media = await store.api.get(f"{base}/720p/index.m3u8")
        assert media.status_code == 200 and media.content == HLS_MEDIA
        assert media.headers["content-type"] == "application/vnd.apple.mpegurl"
        # Segments too: Chromium's native HLS will not play segments redirected to another origin.
        part = await store.api.get(f"{base}/720p/seg-00000.m4s", headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == SEGMENT[:100]
