"""Bad renditions are refused before the video is read: from the query before the body's first byte, from a
multipart field as soon as that field ends (not after the file that follows it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.services.upload.test_api import assert_problem
from tests.services.upload.uploading import bucket_files, multipart


class Watched:
    """A body that counts how many of its chunks the service pulled."""

    def __init__(self, chunks: int = 64, size: int = 64 * 1024) -> None:
        self.pulled = 0
        self._chunks = chunks
        self._size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self._chunks):
            self.pulled += 1
            yield bytes(self._size)


async def test_renditions_in_the_query_are_refused_before_the_body_is_read(
    upload: httpx.AsyncClient, bucket: Path
) -> None:
    body = Watched()
    response = await upload.post(
        "/videos",
        params={"renditions": "720p,4000p"},
        content=body,
        headers={"Content-Type": "video/mp4"},
    )
    problem = assert_problem(response, 422, "renditions")
    assert "2160p, 1440p, 1080p, 720p, 480p, 360p, 240p, 144p" in problem["errors"][0]["expected"]
    assert "4000p" in problem["detail"]
    assert body.pulled == 0
    assert bucket_files(bucket) == []


async def test_a_renditions_field_before_the_file_is_refused_before_the_file_is_read(
    upload: httpx.AsyncClient, bucket: Path
) -> None:
    video = Watched()
    content_type, body = multipart([("renditions", "4000p")], ("cat.mp4", video.__aiter__()))
    response = await upload.post("/videos", content=body, headers={"Content-Type": content_type})
    assert "4000p" in assert_problem(response, 422, "renditions")["detail"]
    assert video.pulled <= 1  # the parser sees the field end with the file part's headers, not later
    assert bucket_files(bucket) == []
