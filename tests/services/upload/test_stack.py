"""The upload service as a real process next to a real router: videos in, events out, everything else refused.

One router and one upload process serve the whole module (starting them is most of the cost).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from router.client import ReceivedMessage, RouterClient
from tests.media import make_audio, make_clip, make_h264_bomb, make_image
from tests.process import ServiceProcess, service
from tests.services.upload.test_probe import (
    FifoSpy,
    Listener,
    dash_manifest,
    ffconcat_list,
    hls_playlist,
    sdp_description,
)
from tests.services.upload.uploading import TUS, bucket_files, chunks_of, multipart, tus_metadata

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "stack-token"
LIMIT = 8 * 1024 * 1024


@dataclass
class Stack:
    router: ServiceProcess
    upload: ServiceProcess
    bucket: Path
    files: Path
    http: httpx.AsyncClient
    events: RouterClient
    listener: Listener
    stored: FifoSpy
    partials: Path
    received: dict[str, ReceivedMessage] = field(default_factory=dict)

    async def event(self, video_id: str, timeout_s: float = 10) -> dict[str, Any]:
        """The `cattube.video.uploaded` event of `video_id`, from the queue subscription."""
        async with asyncio.timeout(timeout_s):
            while video_id not in self.received:
                messages = await self.events.queue("uploaded").receive(max_messages=10, wait_s=5)
                self.received.update({m.event["id"]: m for m in messages})
                if messages:
                    await self.events.queue("uploaded").ack([m.receipt for m in messages])
        return self.received[video_id].event


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    env = {"CATTUBE_DATA_DIR": str(root / "data"), "CATTUBE_TOKEN": TOKEN, "CATTUBE_MAX_UPLOAD_BYTES": str(LIMIT)}
    bucket = root / "data" / "bucket"
    (bucket / "videos" / "someone-else").mkdir(parents=True)
    spy = Listener()
    server = await asyncio.start_server(spy.connected, "127.0.0.1", 0)
    spy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    stored = FifoSpy(bucket / "videos" / "someone-else" / "master.mp4")
    try:
        async with (
            server,
            service("router", env) as router,
            RouterClient(router.url, token=TOKEN) as events,
            service("services.upload", {**env, "CATTUBE_ROUTER_URL": router.url}) as upload,
            httpx.AsyncClient(base_url=upload.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http,
        ):
            await events.ensure_subscription(
                "uploaded", pattern={"type": ["cattube.video.uploaded"]}, target={"queue": {}}, start="earliest"
            )
            partials = root / "data" / "upload" / "partials"
            yield Stack(router, upload, bucket, root / "files", http, events, spy, stored, partials)
    finally:
        stored.stop()


def files(stack: Stack) -> Path:
    stack.files.mkdir(exist_ok=True)
    return stack.files


# Videos in, events out

CLIPS: dict[str, tuple[Callable[[Path], Path], dict[str, Any]]] = {
    "landscape": (
        lambda d: make_clip(d / "landscape.mp4", 1280, 720, 1.0),
        {"width": 1280, "height": 720, "rotation": 0, "audio_codec": "aac"},
    ),
    "portrait": (
        lambda d: make_clip(d / "portrait.mp4", 640, 360, 1.0, rotate=90),
        {"width": 640, "height": 360, "rotation": 90, "audio_codec": "aac"},
    ),
    "silent": (
        lambda d: make_clip(d / "silent.mp4", 640, 360, 1.0, audio=False),
        {"width": 640, "height": 360, "rotation": 0, "audio_codec": None},
    ),
}


@pytest.mark.parametrize("how", ["multipart", "raw"])
@pytest.mark.parametrize("name", sorted(CLIPS))
async def test_a_video_is_stored_and_announced(stack: Stack, name: str, how: str) -> None:
    make, expected = CLIPS[name]
    clip = make(files(stack)).read_bytes()
    title = f"Whiskers, {name}"
    if how == "multipart":
        content_type, body = multipart(
            [("title", title), ("renditions", "720p,360p")], (f"{name}.mp4", chunks_of(clip))
        )
        response = await stack.http.post("/videos", content=body, headers={"Content-Type": content_type})
    else:
        params = {"title": title, "renditions": "720p,360p"}
        response = await stack.http.post("/videos", params=params, content=clip, headers={"Content-Type": "video/mp4"})
    assert response.status_code == 202, response.text
    video_id = response.json()["video_id"]
    assert response.json()["status_url"] == f"{stack.upload.url}/videos/{video_id}"
    master = stack.bucket / "videos" / video_id / "master.mp4"
    assert hashlib.sha256(master.read_bytes()).hexdigest() == hashlib.sha256(clip).hexdigest()
    assert sorted(p.name for p in master.parent.iterdir()) == ["master.mp4"]

    event = await stack.event(video_id)
    assert (event["type"], event["source"], event["id"], event["partitionkey"]) == (
        "cattube.video.uploaded", "cattube/upload", video_id, video_id,
    )  # fmt: skip
    data = event["data"]
    assert data["video_id"] == video_id and data["title"] == title and data["renditions"] == ["720p", "360p"]
    assert data["master"] == {
        "uri": master.resolve().as_uri(),
        "size_bytes": len(clip),
        "sha256": hashlib.sha256(clip).hexdigest(),
        "content_type": "video/mp4",
    }
    probe = data["probe"]
    assert {key: probe[key] for key in expected} == expected
    assert (probe["video_codec"], probe["fps"]) == ("h264", 25.0)
    assert probe["duration_s"] == pytest.approx(1.0, abs=0.1)
    status = (await stack.http.get(f"/videos/{video_id}")).json()
    assert {"uri": data["master"]["uri"], **status["master"]} == data["master"] and "uri" not in status["master"]
    assert status["event"]["status"] in ("pending", "published")


# Everything else refused, leaving nothing behind


def text(d: Path) -> Path:
    path = d / "notes.mp4"
    path.write_text("Whiskers on the beach, take 3.\n" * 40)
    return path


def truncated(d: Path) -> Path:
    path = make_clip(d / "cut.mp4", 320, 240, 2.0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def reference(kind: Callable[[str, Path], str]) -> Callable[[Path, Stack], Path]:
    def make(d: Path, stack: Stack) -> Path:
        make_clip(d / "sibling.mp4", 64, 64, 0.2)
        path = d / f"{kind.__name__}.mp4"
        path.write_text(kind(stack.listener.url, stack.stored.path))
        return path

    return make


REFUSED: dict[str, tuple[Callable[[Path, Stack], Path], int]] = {
    "text": (lambda d, _: text(d), 415),
    "png": (lambda d, _: make_image(d / "still.png"), 415),
    "audio-only": (lambda d, _: make_audio(d / "song.m4a"), 415),
    "truncated-mp4": (lambda d, _: truncated(d), 422),
    "hls-playlist": (reference(hls_playlist), 415),
    "dash-manifest": (reference(dash_manifest), 415),
    "concat-list": (reference(ffconcat_list), 415),
    "sdp-description": (reference(sdp_description), 415),
    "dimension-bomb": (lambda d, _: make_h264_bomb(d / "dimensions.mp4", 12000, 12000), 422),
    "allocation-bomb": (lambda d, _: make_h264_bomb(d / "allocation.mp4", 7680, 4320), 422),
}


async def send_with_tus(http: httpx.AsyncClient, data: bytes) -> httpx.Response:
    """`data` as a resumable upload in two PATCHes; the answer to the last one, which submits it."""
    created = await http.post(
        "/uploads", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": tus_metadata(filename="v.mp4")}
    )
    assert created.status_code == 201, created.text
    half = len(data) // 2
    for offset, part in ((0, data[:half]), (half, data[half:])):
        headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
        response = await http.patch(created.headers["location"], content=part, headers=headers)
    assert (await http.head(created.headers["location"], headers=TUS)).status_code == 404  # nothing kept
    return response


@pytest.mark.parametrize("how", ["multipart", "raw", "tus"])
@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_anything_else_is_refused_and_leaves_nothing(stack: Stack, name: str, how: str) -> None:
    make, status = REFUSED[name]
    data = make(files(stack), stack).read_bytes()
    before = bucket_files(stack.bucket)
    if how == "multipart":
        response = await stack.http.post("/videos", files={"file": ("video.mp4", data, "video/mp4")})
    elif how == "raw":
        response = await stack.http.post("/videos", content=data, headers={"Content-Type": "video/mp4"})
    else:
        response = await send_with_tus(stack.http, data)
        assert not list(stack.partials.glob("*.part"))
    assert response.status_code == status, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["errors"][0]["field"] == "file" and problem["detail"].endswith(".")
    assert bucket_files(stack.bucket) == before
    await asyncio.sleep(0.02)  # give a stray connection to the listener time to show up
    assert stack.listener.connections == 0
    assert not stack.stored.opened


async def test_empty_and_oversized_bodies(stack: Stack) -> None:
    before = bucket_files(stack.bucket)
    empty = await stack.http.post("/videos", content=b"", headers={"Content-Type": "video/mp4"})
    assert empty.status_code == 400, empty.text

    async def too_much() -> AsyncIterator[bytes]:
        for _ in range(LIMIT // (1 << 20) + 1):
            yield bytes(1 << 20)
        yield b"x"

    over = await stack.http.post("/videos", content=too_much(), headers={"Content-Type": "video/mp4"})
    assert over.status_code == 413, over.text
    declared = await stack.http.post("/videos", content=bytes(LIMIT + 1), headers={"Content-Type": "video/mp4"})
    assert declared.status_code == 413, declared.text
    assert bucket_files(stack.bucket) == before


async def test_the_token_is_required(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.upload.url) as anonymous:
        response = await anonymous.post("/videos", content=b"x", headers={"Content-Type": "video/mp4"})
    assert response.status_code == 401
