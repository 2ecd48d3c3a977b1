"""Playback from an S3 bucket (the session's SeaweedFS, signatures checked): the same ranges and validators as
from `file://`, and a bucket that is missing or refuses the credentials named by /readyz."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from services.common.s3_blobs import S3BlobStore
from tests.s3 import CLIENT, S3Server, fresh_bucket
from tests.services.store.test_api import JPEG, MP4, ready_video


@pytest.fixture
async def s3_url(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """`s3://<fresh bucket>/media`, with the `AWS_*` variables the app reads set for the session's server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.app.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.app.secret_access_key)
    monkeypatch.setenv("AWS_REGION", s3.config()["region"])
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    async with fresh_bucket(s3) as bucket:
        yield f"s3://{bucket}/media"


def bucket_of(url: str, s3: S3Server) -> S3BlobStore:
    return S3BlobStore(url, config=s3.config(), client_options=CLIENT)  # type: ignore[arg-type]


async def test_renditions_and_posters_play_from_s3_with_ranges_and_validators(
    make_store: Callable[..., Any], s3: S3Server, s3_url: str
) -> None:
    async with make_store(bucket=bucket_of(s3_url, s3), blob_url=s3_url) as store:
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
