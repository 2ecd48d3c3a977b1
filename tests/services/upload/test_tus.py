"""Resumable uploads (tus 1.0) in-process: the protocol, its refusals, the last byte through POST /videos' path,
one request at a time per upload, and expiry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.upload.app import create_app
from services.upload.partials import Partials
from services.upload.settings import UploadSettings
from tests.conftest import running
from tests.services.upload.test_api import assert_problem
from tests.services.upload.uploading import TUS, bucket_files, padded, tus_metadata

OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}


class Clock:
    """Wall time a test can move forward (expiry outlives restarts, so it runs on wall time)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def upload(upload_settings: Callable[..., UploadSettings], clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(upload_settings(), exit_on_failure=False, clock=clock)) as client:
        yield client


@pytest.fixture
def partials_dir(upload_settings: Callable[..., UploadSettings]) -> Path:
    return upload_settings().partials_dir


def data_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.part")) if directory.exists() else []


async def create(client: httpx.AsyncClient, length: int, **metadata: str) -> str:
    headers = {**TUS, "Upload-Length": str(length)}
    if metadata:
        headers["Upload-Metadata"] = tus_metadata(**metadata)
    response = await client.post("/uploads", headers=headers)
    assert response.status_code == 201, response.text
    assert response.headers["tus-resumable"] == "1.0.0"
    location = response.headers["location"]
    assert location.startswith("http://testserver/uploads/")
    return location.rsplit("/", 1)[1]


async def offset_of(client: httpx.AsyncClient, upload_id: str) -> int:
    response = await client.head(f"/uploads/{upload_id}", headers=TUS)
    assert response.status_code == 200, response.headers
    assert response.headers["cache-control"] == "no-store"
    return int(response.headers["upload-offset"])


async def patch(client: httpx.AsyncClient, upload_id: str, offset: int, data: Any, **headers: str) -> httpx.Response:
    return await client.patch(
        f"/uploads/{upload_id}", content=data, headers={**OCTETS, "Upload-Offset": str(offset), **headers}
    )


# The protocol


async def test_options_says_what_is_spoken(upload_settings: Callable[..., UploadSettings]) -> None:
    settings = upload_settings(user_token="user-token", max_upload_bytes=12345)
    async with running(create_app(settings, exit_on_failure=False)) as client:
        response = await client.options("/uploads")  # no token: what is spoken is no secret
    assert response.status_code == 204
    assert response.headers["tus-version"] == "1.0.0"
    assert set(response.headers["tus-extension"].split(",")) == {"creation", "termination", "checksum", "expiration"}
    assert response.headers["tus-max-size"] == "12345"
    assert "sha1" in response.headers["tus-checksum-algorithm"].split(",")


async def test_an_upload_in_pieces_becomes_a_video(
    upload: httpx.AsyncClient, clip: bytes, bucket: Path, partials_dir: Path
) -> None:
    video = padded(clip, 3 * 1024 * 1024 + 17)
    upload_id = await create(
        upload, len(video), filename="Whiskers at the beach.mp4", title=" \t", renditions="720p, 360p"
    )
    assert await offset_of(upload, upload_id) == 0
    head = await upload.head(f"/uploads/{upload_id}", headers=TUS)
    assert head.headers["upload-length"] == str(len(video))
    assert head.headers["upload-metadata"].startswith("filename ")
    assert "GMT" in head.headers["upload-expires"]

    cuts = [0, 1_000_000, 2_500_000, len(video)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        response = await patch(upload, upload_id, start, video[start:end])
        assert response.status_code == 204, response.text
        assert response.headers["upload-offset"] == str(end)
        assert response.headers["tus-resumable"] == "1.0.0"
    assert await offset_of(upload, upload_id) == len(video)  # complete: nothing left to send

    found = (await upload.get(f"/videos/{upload_id}")).json()  # the upload's id is its video id
    assert found["title"] == "Whiskers at the beach" and found["renditions"] == ["720p", "360p"]
    assert found["master"]["sha256"] == hashlib.sha256(video).hexdigest()
    assert found["master"]["size_bytes"] == len(video)
    assert found["event"]["status"] == "pending"
    assert bucket_files(bucket) == [f"videos/{upload_id}/master.mp4"]
    assert data_files(partials_dir) == []  # the bytes are in the bucket, not twice
    again = await patch(upload, upload_id, 0, b"more")
    assert_problem(again, 409, "header.Upload-Offset")


async def test_the_version_is_required(upload: httpx.AsyncClient) -> None:
    upload_id = await create(upload, 100)
    for headers in ({}, {"Tus-Resumable": "0.2.2"}):
        for response in (
            await upload.post("/uploads", headers={**headers, "Upload-Length": "100"}),
            await upload.head(f"/uploads/{upload_id}", headers=headers),
            await upload.patch(
                f"/uploads/{upload_id}",
                content=b"x",
                headers={**headers, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
            ),
            await upload.delete(f"/uploads/{upload_id}", headers=headers),
        ):
            assert response.status_code == 412, response.request
            assert response.headers["tus-version"] == "1.0.0"
            if response.request.method != "HEAD":
                assert_problem(response, 412, "header.Tus-Resumable")
    assert await offset_of(upload, upload_id) == 0  # nothing was written or removed


async def test_patch_refusals(upload: httpx.AsyncClient, clip: bytes) -> None:
    upload_id = await create(upload, len(clip))
    assert (await patch(upload, upload_id, 0, clip[:100])).status_code == 204

    wrong_offset = await patch(upload, upload_id, 0, clip[:100])
    assert "expected 100" in assert_problem(wrong_offset, 409, "header.Upload-Offset")["detail"]
    wrong_type = await upload.patch(
        f"/uploads/{upload_id}",
        content=clip[100:],
        headers={**TUS, "Upload-Offset": "100", "Content-Type": "application/octet-stream"},
    )
    assert_problem(wrong_type, 415, "header.Content-Type")
    no_offset = await upload.patch(f"/uploads/{upload_id}", content=b"x", headers=OCTETS)
    assert_problem(no_offset, 400, "header.Upload-Offset")
    too_long = await patch(upload, upload_id, 100, clip[100:] + b"extra")
    assert "at most" in assert_problem(too_long, 413, "body")["detail"]
    unknown = await patch(upload, "0" * 32, 0, b"x")
    assert_problem(unknown, 404)
    assert (await upload.head(f"/uploads/{'0' * 32}", headers=TUS)).status_code == 404
    assert (await upload.head("/uploads/not-an-id", headers=TUS)).status_code == 404
    assert_problem(await upload.delete(f"/uploads/{'0' * 32}", headers=TUS), 404)
    assert await offset_of(upload, upload_id) == 100


async def test_a_streamed_body_longer_than_the_upload_is_refused(upload: httpx.AsyncClient) -> None:
    upload_id = await create(upload, 3 << 20)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            sent += 64 * 1024
            yield bytes(64 * 1024)

    assert_problem(await patch(upload, upload_id, 0, endless()), 413, "body")
    assert sent <= (3 << 20) + (2 << 20)  # stopped at the bound, not at the end of the body
    assert await offset_of(upload, upload_id) < 3 << 20


async def test_creation_refusals_create_nothing(
    upload_settings: Callable[..., UploadSettings], partials_dir: Path
) -> None:
    app = create_app(upload_settings(max_upload_bytes=1000), exit_on_failure=False)
    async with running(app) as client:

        async def refused(status: int, field: str, **headers: str) -> dict[str, Any]:
            response = await client.post("/uploads", headers={**TUS, **headers})
            return assert_problem(response, status, field)

        assert "at most 1000" in (await refused(413, "header.Upload-Length", **{"Upload-Length": "1001"}))["detail"]
        await refused(400, "header.Upload-Length")
        await refused(400, "header.Upload-Length", **{"Upload-Length": "0"})
        await refused(400, "header.Upload-Length", **{"Upload-Length": "-5"})
        bad_renditions = tus_metadata(renditions="720p,4000p")
        problem = await refused(
            422, "header.Upload-Metadata.renditions", **{"Upload-Length": "10", "Upload-Metadata": bad_renditions}
        )
        assert "4000p" in problem["detail"]
        long_title = tus_metadata(title="Whiskers " * 40)
        await refused(422, "header.Upload-Metadata.title", **{"Upload-Length": "10", "Upload-Metadata": long_title})
        await refused(400, "header.Upload-Metadata.title", **{"Upload-Length": "10", "Upload-Metadata": "title %%%"})
        not_utf8 = base64.b64encode(b"\xff\xfe").decode()
        await refused(
            400, "header.Upload-Metadata.title", **{"Upload-Length": "10", "Upload-Metadata": f"title {not_utf8}"}
        )
        twice = tus_metadata(title="a") + "," + tus_metadata(title="b")
        await refused(400, "header.Upload-Metadata.title", **{"Upload-Length": "10", "Upload-Metadata": twice})
        assert await app.state.resumable.partials.next_expiry() is None  # not one upload was made
    assert data_files(partials_dir) == []


async def test_checksums(upload: httpx.AsyncClient, clip: bytes) -> None:
    upload_id = await create(upload, len(clip))

    def sha1(data: bytes) -> str:
        return "sha1 " + base64.b64encode(hashlib.sha1(data).digest()).decode()

    good = await patch(upload, upload_id, 0, clip[:500], **{"Upload-Checksum": sha1(clip[:500])})
    assert good.status_code == 204
    bad = await patch(upload, upload_id, 500, clip[500:1000], **{"Upload-Checksum": sha1(b"something else")})
    assert_problem(bad, 460, "header.Upload-Checksum")
    assert await offset_of(upload, upload_id) == 500  # nothing of the bad request counts
    unknown = await patch(upload, upload_id, 500, clip[500:], **{"Upload-Checksum": "crc32 AAAAAA=="})
    assert_problem(unknown, 400, "header.Upload-Checksum")
    rest = await patch(upload, upload_id, 500, clip[500:], **{"Upload-Checksum": sha1(clip[500:])})
    assert rest.status_code == 204 and rest.headers["upload-offset"] == str(len(clip))


async def test_termination(upload: httpx.AsyncClient, clip: bytes, partials_dir: Path) -> None:
    upload_id = await create(upload, len(clip))
    await patch(upload, upload_id, 0, clip[:1000])
    assert data_files(partials_dir) == [f"{upload_id}.part"]
    response = await upload.delete(f"/uploads/{upload_id}", headers=TUS)
    assert response.status_code == 204 and response.headers["tus-resumable"] == "1.0.0"
    assert (await upload.head(f"/uploads/{upload_id}", headers=TUS)).status_code == 404
    assert_problem(await patch(upload, upload_id, 1000, clip[1000:]), 404)
    assert data_files(partials_dir) == []


# The last byte: the path of POST /videos


async def test_a_hostile_file_is_refused_at_its_last_byte_and_leaves_nothing(
    upload: httpx.AsyncClient, clip: bytes, bucket: Path, partials_dir: Path
) -> None:
    text = b"Whiskers on the beach\n" * 50
    upload_id = await create(upload, len(text), filename="notes.mp4")
    assert (await patch(upload, upload_id, 0, text[:100])).status_code == 204
    refused = await patch(upload, upload_id, 100, text[100:])
    direct = await upload.post("/videos", content=text, headers={"Content-Type": "video/mp4"})
    assert refused.status_code == direct.status_code == 415
    assert refused.json()["detail"] == direct.json()["detail"]
    assert_problem(refused, 415, "file")
    assert (await upload.head(f"/uploads/{upload_id}", headers=TUS)).status_code == 404
    assert (await upload.get(f"/videos/{upload_id}")).status_code == 404
    assert bucket_files(bucket) == [] and data_files(partials_dir) == []

    truncated = clip[: len(clip) // 2]
    upload_id = await create(upload, len(truncated))
    assert_problem(await patch(upload, upload_id, 0, truncated), 422, "file")
    assert bucket_files(bucket) == [] and data_files(partials_dir) == []


# One request at a time, the newest wins


async def test_a_newer_request_takes_over_from_a_stalled_patch(upload: httpx.AsyncClient, clip: bytes) -> None:
    video = padded(clip, 4 << 20)
    upload_id = await create(upload, len(video))
    first = 2 << 20
    written = asyncio.Event()
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield video[:first]
        written.set()  # the server asks for more only once it has written what came before
        await never.wait()  # then the client goes silent, its connection still open
        yield video[first:]

    stalled = asyncio.create_task(patch(upload, upload_id, 0, stalls()))
    await written.wait()
    assert await offset_of(upload, upload_id) == first  # the HEAD stopped the stalled PATCH, which kept its bytes
    assert_problem(await stalled, 409)
    rest = await patch(upload, upload_id, first, video[first:])
    assert rest.status_code == 204, rest.text
    assert (await upload.get(f"/videos/{upload_id}")).json()["master"]["sha256"] == hashlib.sha256(video).hexdigest()


async def test_a_client_that_leaves_keeps_what_it_sent(upload: httpx.AsyncClient, clip: bytes) -> None:
    video = padded(clip, 4 << 20)
    upload_id = await create(upload, len(video))

    async def cut_off() -> AsyncIterator[bytes]:
        yield video[: 3 << 20]
        raise ConnectionResetError("the page was reloaded")

    with pytest.raises(ConnectionResetError):
        await patch(upload, upload_id, 0, cut_off())
    assert await offset_of(upload, upload_id) == 3 << 20


# Bytes are promised only once they are on disk


async def test_bytes_after_the_committed_offset_are_cut_off(tmp_path: Path) -> None:
    partials = Partials(tmp_path, expiry_s=60)
    await partials.open()
    try:
        partial = await partials.create(10, "", title=None, renditions=None, filename=None)
        with partials.writer(partial.upload_id, 0) as file:
            await file.write(b"abcd")
            await file.sync()
            await partials.commit(partial.upload_id, file.offset)
            await file.write(b"XYZ")  # written, never committed: what a kill -9 right here leaves behind
        assert partials.data_path(partial.upload_id).read_bytes() == b"abcdXYZ"
        stored = await partials.get(partial.upload_id)
        assert stored is not None and stored.offset == 4
        with partials.writer(partial.upload_id, stored.offset) as file:
            await file.write(b"efghij")
        assert partials.data_path(partial.upload_id).read_bytes() == b"abcdefghij"
    finally:
        await partials.close()


# Expiry


async def test_unfinished_uploads_expire_and_are_swept(
    upload_settings: Callable[..., UploadSettings], clock: Clock, clip: bytes, partials_dir: Path
) -> None:
    app = create_app(upload_settings(resumable_expiry_s=3600), exit_on_failure=False, clock=clock)
    async with running(app) as client:
        upload_id = await create(client, len(clip))
        await patch(client, upload_id, 0, clip[:100])
        kept = await create(client, len(clip))
        clock.now += 1800
        await patch(client, kept, 0, clip[:100])  # a write renews the expiry
        clock.now += 1801
        assert (await client.head(f"/uploads/{upload_id}", headers=TUS)).status_code == 404  # expired at once
        assert await offset_of(client, kept) == 100
        sweeper = app.state.sweeper
        async with sweeper.swept:
            passes = sweeper.passes
            sweeper.wake()  # as the timer would at the expiry, which a moved clock does not reach
            await sweeper.swept.wait_for(lambda: sweeper.passes > passes)
        assert data_files(partials_dir) == [f"{kept}.part"]
        clock.now += 3601
    # Expired while the service was down, and a data file no upload owns: both gone at the next start.
    (partials_dir / f"{'f' * 32}.part").write_bytes(b"stray")
    async with running(create_app(upload_settings(), exit_on_failure=False, clock=clock)):
        assert data_files(partials_dir) == []


async def test_the_sweeper_wakes_at_the_soonest_expiry(upload_settings: Callable[..., UploadSettings]) -> None:
    """Real time: an expiry of a fraction of a second, and the sweeper's own timer (no wake-up from the test)."""
    app = create_app(upload_settings(resumable_expiry_s=0.2), exit_on_failure=False)
    async with running(app) as client:
        upload_id = await create(client, 100)
        await patch(client, upload_id, 0, b"x" * 10)
        sweeper = app.state.sweeper
        async with sweeper.swept:
            await sweeper.swept.wait_for(lambda: not data_files(upload_settings().partials_dir))
        assert await app.state.resumable.partials.next_expiry() is None


async def test_the_page_may_send_tus_requests(upload_settings: Callable[..., UploadSettings]) -> None:
    async with running(create_app(upload_settings(), exit_on_failure=False)) as client:
        preflight = await client.options(
            "/uploads/0123",
            headers={
                "Origin": "http://127.0.0.1:8703",
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type,authorization",
            },
        )
    assert preflight.status_code == 200, preflight.text
    assert "PATCH" in preflight.headers["access-control-allow-methods"]
