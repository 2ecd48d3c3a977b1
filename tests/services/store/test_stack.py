"""A real router and a real store as processes on loopback: the events of an upload and a transcode in, a
playable video out; the store killed and restarted catches up; deletion announced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.client import RouterClient, new_event
from services.common.blobs import FileBlobStore, video_key
from tests.process import free_port, service
from tests.services.store.test_live import sse

pytestmark = pytest.mark.slow

TOKEN = "stack-token"
MP4 = bytes(range(256)) * 64


def video_events(video_id: str, bucket: FileBlobStore) -> list[dict[str, Any]]:
    """What the upload and processing services publish for one video, in order."""

    def emit(kind: str, source: str, data: dict[str, Any], id: str) -> dict[str, Any]:
        return new_event(kind, source, {"video_id": video_id, **data}, id=id, partitionkey=video_id)

    uri = bucket.uri
    master = {
        "uri": uri(video_key(video_id, "master.mp4")),
        "size_bytes": 1,
        "sha256": "0" * 64,
        "content_type": "video/mp4",
    }
    probe = {"duration_s": 1.0, "width": 640, "height": 360, "fps": 25.0, "video_codec": "h264", "rotation": 0}
    rendition = {"name": "360p", "uri": uri(video_key(video_id, "360p.mp4")), "width": 640, "height": 360,
                 "bitrate": 500_000, "size_bytes": len(MP4), "duration_s": 1.0}  # fmt: skip
    upload = {"title": f"Whiskers {video_id}", "master": master, "probe": probe, "renditions": ["360p"]}
    done = {"renditions": [rendition], "skipped": [], "poster": {"uri": uri(video_key(video_id, "poster.jpg"))}}
    return [
        emit("cattube.video.uploaded", "cattube/upload", upload, video_id),
        emit("cattube.transcode.started", "cattube/processing", {"worker": "worker-1", "attempt": 1}, f"{video_id}/s"),
        emit("cattube.transcode.progress", "cattube/processing", {"percent": 50.0, "speed": 3.0}, f"{video_id}/p"),
        emit("cattube.transcode.completed", "cattube/processing", {**done, "elapsed_s": 0.5}, f"{video_id}/c"),
    ]


async def put_outputs(bucket: FileBlobStore, video_id: str) -> None:
    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        yield data

    await bucket.write(video_key(video_id, "360p.mp4"), chunks(MP4))
    await bucket.write(video_key(video_id, "poster.jpg"), chunks(b"\xff\xd8\xff" + b"\x00" * 64))


async def until_ready(events: AsyncIterator[tuple[str, Any]], video_id: str) -> dict[str, Any]:
    async for kind, data in events:
        if kind == "video" and data["video_id"] == video_id and data["status"] == "ready":
            return dict(data)
    raise AssertionError("the stream ended")


async def test_events_in_a_playable_video_out_across_a_store_restart(tmp_path: Path) -> None:
    router_port, store_port = free_port(), free_port()
    env = {
        "CATTUBE_DATA_DIR": str(tmp_path / "data"),
        "CATTUBE_TOKEN": TOKEN,
        "CATTUBE_ROUTER_URL": f"http://127.0.0.1:{router_port}",
        "CATTUBE_STORE_PORT": str(store_port),  # the address the store gives the router to push to
        "CATTUBE_ROUTER_DURABILITY": "batched",
    }
    bucket = FileBlobStore(tmp_path / "data" / "bucket")
    store_url = f"http://127.0.0.1:{store_port}"
    async with asyncio.timeout(50):
        # The store first: it keeps declaring its subscription until the router is there.
        async with service("services.store", env, port=store_port) as store, service("router", env, port=router_port):
            async with (
                RouterClient(f"http://127.0.0.1:{router_port}", token=TOKEN) as router,
                httpx.AsyncClient(base_url=store_url, timeout=30) as client,
            ):
                await router.ensure_subscription(
                    "observer",
                    pattern={"source": ["cattube/store"]},
                    target={"queue": {}},
                    start="earliest",
                )
                async with client.stream("GET", "/events") as stream:
                    events = sse(stream.aiter_lines())
                    assert (await anext(events))[0] == "ready"
                    await put_outputs(bucket, "v1")
                    await router.publish_batch(video_events("v1", bucket))
                    video = await until_ready(events, "v1")
                assert video["renditions"][0]["url"] == f"{store_url}/videos/v1/renditions/360p"
                assert (video["progress"], video["title"]) == (100.0, "Whiskers v1")

                part = await client.get("/videos/v1/renditions/360p", headers={"Range": "bytes=-100"})
                assert part.status_code == 206 and part.content == MP4[-100:]
                assert part.headers["content-range"] == f"bytes {len(MP4) - 100}-{len(MP4) - 1}/{len(MP4)}"
                assert (await client.get("/videos/v1/poster")).headers["content-type"] == "image/jpeg"

                # Killed, events published while it is down, restarted: the router delivers them then.
                await store.kill()
                await put_outputs(bucket, "v2")
                await router.publish_batch(video_events("v2", bucket))
                await store.start()
                async with client.stream("GET", "/events") as stream:
                    events = sse(stream.aiter_lines())
                    assert (await anext(events))[0] == "ready"
                    if (await client.get("/videos/v2")).json().get("status") != "ready":
                        await until_ready(events, "v2")

                deleted = await client.delete("/videos/v1", headers={"Authorization": f"Bearer {TOKEN}"})
                assert deleted.status_code == 202
                assert (await client.get("/videos/v1")).status_code == 404

                announced: dict[str, list[str]] = {}
                queue = router.queue("observer")
                while len(announced.get("cattube.video.ready", [])) < 2 or "cattube.video.deleted" not in announced:
                    for message in await queue.receive(max_messages=10, wait_s=5):
                        announced.setdefault(message.event["type"], []).append(message.event["data"]["video_id"])
                        await queue.ack([message.receipt])
                assert sorted(announced["cattube.video.ready"]) == ["v1", "v2"]
                assert announced["cattube.video.deleted"] == ["v1"]
