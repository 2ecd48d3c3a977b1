"""Resumable uploads through the whole stack, sent by an independent tus client (tuspy, from PyPI)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tusclient.client import TusClient

from tests.e2e.stack import Stack
from tests.e2e.test_stack import until, watching
from tests.media import make_clip
from tests.services.upload.uploading import padded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MB = 1000 * 1000
CHUNK = 5 * MB


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(tmp_path / "data", CATTUBE_SCALE_IN_COOLDOWN_S="1")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_tuspy_interrupted_after_two_chunks_resumes_and_the_video_becomes_ready(
    stack: Stack, tmp_path: Path
) -> None:
    # A real 2 s clip grown to 50 MB with an MP4 `free` box: every byte is sent, decoding stays cheap.
    path = tmp_path / "whiskers-50mb.mp4"
    path.write_bytes(padded(make_clip(tmp_path / "clip.mp4", 320, 240, 2).read_bytes(), 50 * MB))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    endpoint = f"{stack.url('upload')}/uploads"
    metadata = {"filename": path.name, "title": "Whiskers, resumed", "renditions": "240p"}

    def first_two_chunks() -> str:
        client = TusClient(endpoint, headers=stack.auth("user"))
        with path.open("rb") as stream:  # given a path, tuspy leaves the file open
            uploader = client.uploader(file_stream=stream, chunk_size=CHUNK, metadata=metadata)
            uploader.upload_chunk()
            uploader.upload_chunk()
        assert uploader.offset == 2 * CHUNK
        url: str = uploader.url
        return url  # and the client goes away, as a process that was stopped

    def the_rest(url: str) -> int:
        client = TusClient(endpoint, headers=stack.auth("user"))
        with path.open("rb") as stream:
            uploader = client.uploader(file_stream=stream, url=url, chunk_size=CHUNK)
            resumed_at: int = uploader.offset  # asked with HEAD
            uploader.upload()
        return resumed_at

    async with watching(stack) as changes:
        url = await asyncio.to_thread(first_two_chunks)
        video_id = url.rsplit("/", 1)[1]
        assert await asyncio.to_thread(the_rest, url) == 2 * CHUNK
        video = (await until(changes, {video_id}, {"ready", "failed"}))[video_id]
    assert video["status"] == "ready", video
    assert video["title"] == "Whiskers, resumed"
    assert [r["name"] for r in video["renditions"]] == ["240p"]
    async with httpx.AsyncClient(timeout=30) as http:
        upload = (await http.get(f"{stack.url('upload')}/videos/{video_id}", headers=stack.auth("user"))).json()
    assert upload["master"]["sha256"] == sha256 and upload["master"]["size_bytes"] == 50 * MB
    master = stack.data_dir / "bucket" / "videos" / video_id / "master.mp4"
    assert hashlib.sha256(master.read_bytes()).hexdigest() == sha256
    assert not list((stack.data_dir / "upload" / "partials").glob("*.part"))  # not kept twice
