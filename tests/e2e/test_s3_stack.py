"""The whole stack as processes (`cattube up`) on an S3 bucket: the session's SeaweedFS, signatures checked.

Nothing of the videos touches the data directory for good: the upload's spool and the jobs' scratch are
empty once a video is ready, the store plays it from the bucket, and deleting it removes its objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from router.client import RouterClient
from services.common.s3_blobs import S3BlobStore
from services.processing.deletions import deletions_queue_name
from tests.e2e.stack import Stack
from tests.e2e.test_stack import FINAL, decoded_frames, until, upload, watching
from tests.media import make_clip
from tests.s3 import CLIENT, S3Server, fresh_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class S3Stack:
    stack: Stack
    bucket: S3BlobStore
    """The same bucket the services use, seen by the test."""


@pytest.fixture
async def s3_stack(tmp_path: Path, s3: S3Server) -> AsyncIterator[S3Stack]:
    async with fresh_bucket(s3) as name:
        blob_url = f"s3://{name}/cattube"
        running = Stack(
            tmp_path / "data",
            CATTUBE_BLOB_URL=blob_url,
            **s3.environment(),
            CATTUBE_SCALE_IN_COOLDOWN_S="1",
            CATTUBE_MAX_WORKERS="2",
        )
        await running.start()
        try:
            yield S3Stack(running, S3BlobStore(blob_url, config=s3.config(), client_options=CLIENT))  # type: ignore[arg-type]
        finally:
            await running.stop()


def files_under(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()] if directory.exists() else []


async def test_a_clip_becomes_ready_plays_from_the_bucket_and_delete_removes_its_objects(
    s3_stack: S3Stack, tmp_path: Path
) -> None:
    stack, bucket = s3_stack.stack, s3_stack.bucket
    async with watching(stack) as changes:
        video_id = await upload(stack, make_clip(tmp_path / "whiskers.mp4", 640, 360, 2))
        final = await until(changes, {video_id}, FINAL)
    assert final[video_id]["status"] == "ready", final
    prefix = f"videos/{video_id}/"
    stored_keys = await bucket.list(prefix)
    assert [key for key in stored_keys if "/hls/" not in key] == [
        f"{prefix}{name}" for name in ("240p.mp4", "360p.mp4", "master.mp4", "poster.jpg")
    ]
    package = {key.split("/", 4)[4] for key in stored_keys if "/hls/" in key}  # below videos/{id}/hls/{version}/
    assert {"master.m3u8", "360p/index.m3u8", "360p/init.mp4", "240p/seg-00000.m4s"} <= package
    data = stack.data_dir
    assert not (data / "bucket").exists()  # nothing went to a local bucket
    assert files_under(data / "upload" / "spool") == []  # the probe's copy is gone
    assert files_under(data / "processing" / "work") == []  # and so is the jobs' scratch

    async with httpx.AsyncClient(timeout=30) as client:
        video = (await client.get(f"{stack.url('store')}/videos/{video_id}")).json()
        for rendition in video["renditions"]:
            key = f"{prefix}{rendition['name']}.mp4"
            stored = b"".join([chunk async for chunk in bucket.read(key)])
            assert rendition["size_bytes"] == len(stored)
            ranged = await client.get(rendition["url"], headers={"Range": "bytes=100-1099"})
            assert ranged.status_code == 206 and ranged.content == stored[100:1100]
        poster = await client.get(video["poster_url"])
        assert poster.status_code == 200 and poster.content == b"".join(
            [chunk async for chunk in bucket.read(f"{prefix}poster.jpg")]
        )
        # The HLS package plays from the bucket through the store: each variant decodes whole over HTTP.
        for rung in ("360p", "240p"):
            frames = await asyncio.to_thread(decoded_frames, urljoin(video["hls_url"], f"{rung}/index.m3u8"))
            assert len(frames) == 50, rung  # 2 s at 25 fps

    async with RouterClient(stack.url("router"), token=stack.tokens["service"]) as router:
        async with httpx.AsyncClient() as client:
            processing = await client.get(f"{stack.url('processing')}/autoscaler", headers=stack.auth("service"))
            deletions = deletions_queue_name(processing.json()["instance"])
            before = await router.stats(deletions)
            deleted = await client.delete(f"{stack.url('store')}/videos/{video_id}", headers=stack.auth("user"))
            assert deleted.status_code == 202
        # The processing service acks the deletion once the objects are gone: follow its queue, no polling.
        async with asyncio.timeout(60), aclosing(router.watch_stats(deletions)) as watch:
            async for stats in watch:
                if stats.delivered_total > before.delivered_total:
                    break
    assert await bucket.list(prefix) == []
