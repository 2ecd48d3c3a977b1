"""Real processes, hard times: the router goes away mid-upload, the upload service is killed, a big upload.

An upload never waits for the router: its event sits in the outbox until the router is back, also
across a `kill -9` of the upload service; and streaming a large body keeps the service's memory flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.client import RouterClient
from tests.media import make_clip
from tests.process import ServiceProcess, free_port, service
from tests.services.upload.uploading import TUS, bucket_files, multipart, padded

pytestmark = pytest.mark.slow

UPLOADED = {"type": ["cattube.video.uploaded"]}
FAST_RELAY = {"CATTUBE_RELAY_BACKOFF_INITIAL_S": "0.1", "CATTUBE_RELAY_BACKOFF_MAX_S": "0.5"}


async def next_event(router_url: str, timeout_s: float = 15) -> dict[str, Any]:
    """The first `cattube.video.uploaded` event on the bus (a queue subscription from the earliest event)."""
    async with RouterClient(router_url) as router:
        await router.ensure_subscription("uploaded", pattern=UPLOADED, target={"queue": {}}, start="earliest")
        async with asyncio.timeout(timeout_s):
            while not (messages := await router.queue("uploaded").receive(wait_s=5)):
                pass
    event: dict[str, Any] = messages[0].event
    return event


async def test_the_router_stopped_during_an_upload(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "cat.mp4", 320, 240, 1.0).read_bytes()
    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), **FAST_RELAY}
    router = ServiceProcess("router", free_port(), env)
    await router.start()
    try:
        async with (
            service("services.upload", {**env, "CATTUBE_ROUTER_URL": router.url}) as upload,
            httpx.AsyncClient(base_url=upload.url, timeout=30) as http,
        ):
            halfway = asyncio.Event()
            router_gone = asyncio.Event()

            async def body() -> AsyncIterator[bytes]:
                yield clip[: len(clip) // 2]
                halfway.set()
                await router_gone.wait()
                yield clip[len(clip) // 2 :]

            sending = asyncio.create_task(
                http.post("/videos", content=body(), headers={"Content-Type": "video/mp4"}, params={"title": "T"})
            )
            await halfway.wait()
            await router.stop()  # SIGTERM: a clean stop, while the upload is half sent
            router_gone.set()
            response = await sending
            assert response.status_code == 202, response.text
            video_id = response.json()["video_id"]
            assert (await http.get(f"/videos/{video_id}")).json()["event"]["status"] == "pending"

            await router.start()
            event = await next_event(router.url)
            assert event["id"] == video_id and event["data"]["title"] == "T"
            assert event["data"]["master"]["sha256"] == hashlib.sha256(clip).hexdigest()
    finally:
        await router.kill()


async def test_the_upload_service_killed_with_events_in_its_outbox(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "cat.mp4", 320, 240, 1.0).read_bytes()
    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), "CATTUBE_ROUTER_URL": f"http://127.0.0.1:{free_port()}"}
    env.update(FAST_RELAY)
    bucket = tmp_path / "data" / "bucket"
    upload = ServiceProcess("services.upload", free_port(), env)
    await upload.start()
    try:
        async with httpx.AsyncClient(base_url=upload.url, timeout=30) as http:
            response = await http.post("/videos", files={"file": ("cat.mp4", clip)})
            assert response.status_code == 202, response.text
            video_id = response.json()["video_id"]

            # A second upload is cut short by the kill: far more than the socket buffers hold has been sent,
            # so the service has begun writing it into the bucket.
            sent_enough = asyncio.Event()

            async def endless() -> AsyncIterator[bytes]:
                for index in range(10_000):
                    if index == 64:
                        sent_enough.set()
                    yield bytes(1 << 20)

            content_type, body = multipart([], ("endless.mp4", endless()))
            cut_short = asyncio.create_task(http.post("/videos", content=body, headers={"Content-Type": content_type}))
            await sent_enough.wait()
            await upload.kill()
            with contextlib.suppress(httpx.HTTPError):
                await cut_short
        assert any("/incoming/" in name for name in bucket_files(bucket))  # the partial upload, left by the kill

        async with service("router", env, port=int(env["CATTUBE_ROUTER_URL"].rsplit(":", 1)[1])) as router:
            await upload.start()
            event = await next_event(router.url)
        assert event["id"] == video_id
        assert bucket_files(bucket) == [f"videos/{video_id}/master.mp4"]  # the partial upload was swept
    finally:
        await upload.kill()


def peak_rss_kib(pid: int) -> int:
    """The peak resident set size of a process so far (`VmHWM`), in KiB."""
    return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0])


def free_box(filler_bytes: int) -> bytes:
    """The header of an MP4 `free` box (64-bit size) that holds `filler_bytes`: filler every demuxer skips."""
    return struct.pack(">I4sQ", 1, b"free", 16 + filler_bytes)


async def test_memory_stays_flat_while_a_large_upload_streams(tmp_path: Path) -> None:
    """300 MB through multipart: a real 1 s MP4 followed by a 300 MB `free` box, so the probe accepts it."""
    clip = make_clip(tmp_path / "cat.mp4", 320, 240, 1.0).read_bytes()
    filler = 300 * 1024 * 1024
    digest = hashlib.sha256()

    async def large() -> AsyncIterator[bytes]:
        for piece in (clip, free_box(filler)):
            digest.update(piece)
            yield piece
        block = bytes(1 << 20)
        for _ in range(filler >> 20):
            digest.update(block)
            yield block

    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), "CATTUBE_ROUTER_URL": f"http://127.0.0.1:{free_port()}"}
    async with (
        service("services.upload", env) as upload,
        httpx.AsyncClient(base_url=upload.url, timeout=60) as http,
    ):
        assert upload.proc is not None
        content_type, body = multipart([("title", "large")], ("large.mp4", large()))
        response = await http.post("/videos", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 202, response.text
        peak_kib = peak_rss_kib(upload.proc.pid)
        master = (await http.get(f"/videos/{response.json()['video_id']}")).json()["master"]
    assert master["size_bytes"] == len(clip) + 16 + filler
    assert master["sha256"] == digest.hexdigest()
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
    for path in (tmp_path / "data" / "bucket").rglob("master.*"):
        path.unlink()  # 300 MB that pytest would otherwise keep with the last runs' temporary directories


async def test_head_after_a_kill_reports_the_bytes_on_disk(tmp_path: Path) -> None:
    """tus: what a PATCH acknowledged survives a kill -9, and so does what a cut-off PATCH had fsynced."""
    video = padded(make_clip(tmp_path / "cat.mp4", 320, 240, 1.0).read_bytes(), 40 << 20)
    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), "CATTUBE_ROUTER_URL": f"http://127.0.0.1:{free_port()}"}
    upload = ServiceProcess("services.upload", free_port(), {**env, "CATTUBE_LOG_LEVEL": "debug"})
    await upload.start()
    try:
        async with httpx.AsyncClient(base_url=upload.url, timeout=30) as http:

            async def offset() -> int:
                response = await http.head(url, headers=TUS)
                assert response.status_code == 200, response.headers
                return int(response.headers["upload-offset"])

            async def patch(start: int, body: bytes | AsyncIterator[bytes]) -> httpx.Response:
                headers = {**TUS, "Upload-Offset": str(start), "Content-Type": "application/offset+octet-stream"}
                return await http.patch(url, content=body, headers=headers)

            created = await http.post("/uploads", headers={**TUS, "Upload-Length": str(len(video))})
            url = created.headers["location"]
            chunk = 5 << 20
            for start in (0, chunk):
                assert (await patch(start, video[start : start + chunk])).status_code == 204
            await upload.kill()
            await upload.start()
            assert await offset() == 2 * chunk  # exactly what was acknowledged

            # A PATCH cut off by the kill once the service has said it passed a checkpoint (every 8 MiB).
            async def stalls() -> AsyncIterator[bytes]:
                yield video[2 * chunk : 5 * chunk]
                await asyncio.Event().wait()
                yield b""

            checkpoint = asyncio.create_task(upload.wait_for_log("checkpoint"))
            cut_off = asyncio.create_task(patch(2 * chunk, stalls()))
            await checkpoint
            await upload.kill()
            cut_off.cancel()  # its body waits for ever: the client would never notice the server is gone
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await cut_off
            await upload.start()
            kept = await offset()
            assert 2 * chunk < kept <= 5 * chunk
            # Whatever was kept is the right bytes: the rest from there makes the same file.
            assert (await patch(kept, video[kept:])).status_code == 204
            master = (await http.get(f"/videos/{url.rsplit('/', 1)[1]}")).json()["master"]
        assert master["sha256"] == hashlib.sha256(video).hexdigest()
    finally:
        await upload.kill()
