"""Uploads into an S3 bucket (SeaweedFS, signatures checked): streamed to the bucket while a local spool feeds
the probe, the spool removed whatever happens; refusals and faults leave nothing, as on `file://`."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest
from fastapi import FastAPI
from starlette.requests import ClientDisconnect

from services.common.db import SQLiteDatabase
from services.common.s3_blobs import S3BlobStore
from services.upload import uploads
from services.upload.app import create_app
from services.upload.outbox import MIGRATIONS, Outbox
from services.upload.settings import UploadSettings
from services.upload.spool import Spool
from tests.conftest import running
from tests.media import make_clip
from tests.process import free_port, service
from tests.s3 import S3Server, new_bucket, throwaway_seaweedfs
from tests.services.upload.test_api import assert_problem
from tests.services.upload.test_resilience import free_box, peak_rss_kib
from tests.services.upload.uploading import chunks_of, multipart


async def everything_in(bucket: S3BlobStore) -> list[str]:
    """Every object below the bucket's prefix, the checksum sidecars (`.name.sha256`) included."""
    paths = [meta["path"] async for batch in obstore.list(bucket.store, bucket.prefix) for meta in batch]
    return sorted(path.removeprefix(f"{bucket.prefix}/") for path in paths)


def spooled(settings: UploadSettings) -> list[str]:
    directory = settings.spool_dir
    return sorted(entry.name for entry in directory.iterdir()) if directory.exists() else []


async def nothing_kept(app: FastAPI) -> None:
    """No spool, no upload noted as arriving, no event waiting."""
    assert spooled(app.state.settings) == []
    assert await app.state.outbox.unfinished() == []
    assert await app.state.outbox.pending_count() == 0


async def test_raw_and_multipart_uploads_stream_into_the_bucket_and_leave_no_spool(
    upload_settings: Callable[..., UploadSettings], s3: S3Server, s3_url: str, clip: bytes
) -> None:
    bucket = s3.bucket(s3_url)
    settings = upload_settings(blob_url=s3_url)
    app = create_app(settings, exit_on_failure=False)
    async with running(app) as upload:
        raw = await upload.post(
            "/videos", content=chunks_of(clip, 4096), headers={"Content-Type": "video/mp4"}, params={"title": "Raw"}
        )
        assert raw.status_code == 202, raw.text
        content_type, body = multipart([("title", "Form")], ("cat.mp4", chunks_of(clip)))
        form = await upload.post("/videos", content=body, headers={"Content-Type": content_type})
        assert form.status_code == 202, form.text
        ids = [raw.json()["video_id"], form.json()["video_id"]]
        for video_id, title in zip(ids, ["Raw", "Form"], strict=True):
            found = (await upload.get(f"/videos/{video_id}")).json()
            assert found["title"] == title and found["probe"]["video_codec"] == "h264"
            assert found["master"]["sha256"] == hashlib.sha256(clip).hexdigest()
        assert spooled(settings) == []
        assert await app.state.outbox.pending_count() == 2
        (event,) = await app.state.outbox.db.transact(
            lambda conn: [row[0] for row in conn.fetch("SELECT event FROM outbox LIMIT 1")]
        )
    assert await bucket.list() == sorted(f"videos/{video_id}/master.mp4" for video_id in ids)
    for video_id in ids:
        info = await bucket.stat(f"videos/{video_id}/master.mp4")
        assert info is not None and info.size_bytes == len(clip)
        assert info.sha256 == hashlib.sha256(clip).hexdigest()
        assert b"".join([chunk async for chunk in bucket.read(info.key)]) == clip
    assert f'"{s3_url}/videos/{ids[0]}/master.mp4"' in event  # the event names the object in the bucket
    assert await s3.unfinished_uploads(s3_url.split("/")[2]) == []


async def test_the_spool_holds_what_the_bucket_got_while_it_streams_and_is_gone_after(
    upload_settings: Callable[..., UploadSettings], s3_url: str, clip: bytes
) -> None:
    settings = upload_settings(blob_url=s3_url)
    app = create_app(settings, exit_on_failure=False)
    filler = bytes(2 << 20)
    first = clip + free_box(len(filler)) + filler[: 1 << 20]  # past one write piece of 1 MiB
    halfway = asyncio.Event()
    go_on = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield clip
        yield free_box(len(filler))
        yield filler[: 1 << 20]
        # Asked for more: the piece before went through the spool to the bucket already.
        halfway.set()
        await go_on.wait()
        yield filler[1 << 20 :]

    async with running(app) as upload:
        sending = asyncio.create_task(upload.post("/videos", content=slow(), headers={"Content-Type": "video/mp4"}))
        await halfway.wait()
        (spool,) = settings.spool_dir.iterdir()
        assert spool.read_bytes() == first
        go_on.set()
        response = await sending
        assert response.status_code == 202, response.text
        assert spool.name == f"{response.json()['video_id']}.upload"
        assert (await upload.get(f"/videos/{response.json()['video_id']}")).json()["master"]["size_bytes"] == len(
            first
        ) + (1 << 20)
        await nothing_kept_but_the_event(app)


async def nothing_kept_but_the_event(app: FastAPI) -> None:
    assert spooled(app.state.settings) == []
    assert await app.state.outbox.unfinished() == []


async def test_refusals_leave_no_object_no_spool_and_no_record(
    upload_settings: Callable[..., UploadSettings], s3: S3Server, s3_url: str, clip: bytes
) -> None:
    bucket = s3.bucket(s3_url)
    limit = 256 * 1024
    app = create_app(upload_settings(blob_url=s3_url, max_upload_bytes=limit), exit_on_failure=False)

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(1000):
            yield bytes(64 * 1024)

    async def cut_off() -> AsyncIterator[bytes]:
        yield clip[:1000]
        yield bytes(64 * 1024)
        raise ClientDisconnect  # what Starlette's request.stream() raises when the connection drops

    async with running(app) as upload:
        text = await upload.post("/videos", content=b"Whiskers\n" * 50, headers={"Content-Type": "video/mp4"})
        assert "text" in assert_problem(text, 415, "file")["detail"]
        truncated = await upload.post("/videos", files={"file": ("cut.mp4", clip[: len(clip) // 2])})
        assert "truncated" in assert_problem(truncated, 422, "file")["detail"]
        assert_problem(await upload.post("/videos", content=b"", headers={"Content-Type": "video/mp4"}), 400, "file")
        too_large = await upload.post("/videos", content=endless(), headers={"Content-Type": "video/mp4"})
        assert_problem(too_large, 413, "body")
        bad_query = await upload.post(
            "/videos", content=clip, headers={"Content-Type": "video/mp4"}, params={"renditions": "4k"}
        )
        assert_problem(bad_query, 422, "renditions")
        with pytest.raises(ClientDisconnect):
            await app.state.uploads.receive("video/mp4", cut_off())
        await nothing_kept(app)
        metrics = (await upload.get("/metrics")).text
    assert await bucket.list() == []
    for status in ("400", "413", "415", "422", "aborted"):
        assert f'cattube_upload_refused_total{{status="{status}"}}' in metrics


async def test_a_master_too_large_for_one_copy_is_uploaded_again_from_the_spool(
    upload_settings: Callable[..., UploadSettings],
    s3: S3Server,
    s3_url: str,
    clip: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uploads, "COPY_MAX_BYTES", len(clip) - 1)  # S3's limit is 5 GiB: this clip stands for more
    monkeypatch.setattr(uploads, "likely_extension", lambda first: None)  # no guess: the master has to move
    bucket = s3.bucket(s3_url)
    app = create_app(upload_settings(blob_url=s3_url), exit_on_failure=False)
    copies = 0
    async with running(app) as upload:
        store = app.state.uploads.store
        real_copy = store.copy

        async def counted(source: str, target: str) -> Any:
            nonlocal copies
            copies += 1
            return await real_copy(source, target)

        store.copy = counted
        response = await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"})
        assert response.status_code == 202, response.text
        await nothing_kept_but_the_event(app)
    video_id = response.json()["video_id"]
    info = await bucket.stat(f"videos/{video_id}/master.mp4")
    assert copies == 0
    assert info is not None and info.sha256 == hashlib.sha256(clip).hexdigest() and info.size_bytes == len(clip)
    assert await everything_in(bucket) == [f"videos/{video_id}/master.mp4"]  # the checksum is its own metadata


@pytest.mark.parametrize("guess", ["mp4", "mkv", None])
async def test_the_master_streams_under_its_likely_name_and_moves_only_when_the_probe_disagrees(
    upload_settings: Callable[..., UploadSettings],
    s3: S3Server,
    s3_url: str,
    clip: bytes,
    guess: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if guess != "mp4":  # what the first bytes of an MP4 tell, else a wrong guess or none
        monkeypatch.setattr(uploads, "likely_extension", lambda first: guess)
    bucket = s3.bucket(s3_url)
    app = create_app(upload_settings(blob_url=s3_url), exit_on_failure=False)
    copies: list[tuple[str, str]] = []
    async with running(app) as upload:
        store = app.state.uploads.store
        real_copy = store.copy

        async def counted(source: str, target: str) -> Any:
            copies.append((source, target))
            return await real_copy(source, target)

        store.copy = counted
        response = await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"})
        assert response.status_code == 202, response.text
        record = (await upload.get(f"/videos/{response.json()['video_id']}")).json()
    video_id = response.json()["video_id"]
    prefix = f"videos/{video_id}/"
    moved_from = {"mp4": None, "mkv": f"{prefix}master.mkv", None: f"{prefix}incoming/master.upload"}[guess]
    assert copies == ([] if moved_from is None else [(moved_from, f"{prefix}master.mp4")])
    assert await everything_in(bucket) == [f"{prefix}.master.mp4.sha256", f"{prefix}master.mp4"]  # nothing else
    assert record["master"]["sha256"] == hashlib.sha256(clip).hexdigest()


async def test_spools_and_objects_left_by_a_crash_are_swept_at_start(
    upload_settings: Callable[..., UploadSettings], s3: S3Server, s3_url: str
) -> None:
    bucket = s3.bucket(s3_url)
    settings = upload_settings(blob_url=s3_url)
    outbox = Outbox(SQLiteDatabase(settings.outbox_file, MIGRATIONS))
    await outbox.open()
    await outbox.begin("interrupted")
    await outbox.close()
    await bucket.write("videos/interrupted/incoming/master.upload", chunks_of(b"partial"))
    settings.spool_dir.mkdir(parents=True)
    (settings.spool_dir / "interrupted.upload").write_bytes(b"partial")
    (settings.spool_dir / "older.upload").write_bytes(b"from a crash before that one")
    app = create_app(settings, exit_on_failure=False)
    async with running(app) as upload:
        assert (await upload.get("/videos/interrupted")).status_code == 404
        await nothing_kept(app)
    assert await bucket.list() == []


async def test_a_full_scratch_disk_is_507_and_leaves_nothing(
    upload_settings: Callable[..., UploadSettings],
    s3: S3Server,
    s3_url: str,
    clip: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_tee = Spool.tee

    async def fills_up(spool: Spool, pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for piece in real_tee(spool, pieces):
            yield piece  # the first piece reaches the spool and the bucket's multipart upload
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "tee", fills_up)
    app = create_app(upload_settings(blob_url=s3_url), exit_on_failure=False)
    async with running(app) as upload:
        body = clip + bytes(6 << 20)  # past one part: the multipart upload is under way when the disk fills
        response = await upload.post("/videos", content=chunks_of(body), headers={"Content-Type": "video/mp4"})
        problem = assert_problem(response, 507)
        assert "nothing of it was kept" in problem["detail"]
        await nothing_kept(app)
    assert await everything_in(s3.bucket(s3_url)) == []


async def test_a_sweep_while_serving_leaves_live_uploads_alone(
    upload_settings: Callable[..., UploadSettings], s3_url: str, clip: bytes
) -> None:
    """The bucket's sweep may run late (the database was away at start): it must not touch uploads under way."""
    settings = upload_settings(blob_url=s3_url)
    app = create_app(settings, exit_on_failure=False)
    halfway = asyncio.Event()
    go_on = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield clip[:100]
        halfway.set()
        await go_on.wait()
        yield clip[100:]

    async with running(app) as upload:
        sending = asyncio.create_task(upload.post("/videos", content=slow(), headers={"Content-Type": "video/mp4"}))
        await halfway.wait()
        assert await app.state.uploads.sweep() == 0  # as the deferred sweep runs it
        assert len(spooled(settings)) == 1
        go_on.set()
        response = await sending
        assert response.status_code == 202, response.text


# Faults: the bucket cannot be reached, refuses the credentials, does not exist, or dies mid-upload.


@pytest.mark.parametrize("fault", ["unreachable", "credentials", "no-bucket"])
async def test_a_bucket_that_cannot_be_used_is_503_naming_why_and_keeps_nothing(
    upload_settings: Callable[..., UploadSettings],
    s3: S3Server,
    s3_url: str,
    clip: bytes,
    fault: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blob_url = s3_url
    if fault == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    elif fault == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + secrets.token_hex(8))
    else:
        blob_url = f"s3://cattube-test-missing-{secrets.token_hex(4)}/media"
    app = create_app(upload_settings(blob_url=blob_url), exit_on_failure=False)
    async with running(app) as upload:
        ready = await upload.get("/readyz")
        assert ready.status_code == 503
        for response in (
            await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"}),
            await upload.post("/videos", files={"file": ("cat.mp4", clip)}),
        ):
            problem = assert_problem(response, 503)
            expected = {
                "unreachable": "could not list",
                "credentials": "AWS_SECRET_ACCESS_KEY",
                "no-bucket": f"the bucket '{blob_url.split('/')[2]}' does not exist",
            }[fault]
            assert expected in problem["detail"], problem
        await nothing_kept(app)
        assert (await upload.get("/healthz")).status_code == 200  # up, not crashed
    assert await s3.bucket(s3_url).list() == []


async def test_s3_killed_mid_upload_is_503_and_keeps_nothing(
    upload_settings: Callable[..., UploadSettings], clip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    with throwaway_seaweedfs() as server:
        assert server.pid is not None
        for variable, value in server.environment().items():
            monkeypatch.setenv(variable, value)
        bucket = await new_bucket(server)  # not emptied afterwards: the server is killed, and thrown away
        app = create_app(upload_settings(blob_url=f"s3://{bucket}/media"), exit_on_failure=False)
        parts_sent = asyncio.Event()
        killed = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield clip
            for _ in range(12):  # past two parts of 5 MiB: the multipart upload is under way
                yield bytes(1 << 20)
            parts_sent.set()
            await killed.wait()
            for _ in range(12):
                yield bytes(1 << 20)

        async with running(app) as upload:
            assert (await upload.get("/readyz")).status_code == 200
            sending = asyncio.create_task(upload.post("/videos", content=body(), headers={"Content-Type": "video/mp4"}))
            await parts_sent.wait()
            os.kill(server.pid, signal.SIGKILL)
            killed.set()
            response = await sending
            problem = assert_problem(response, 503)
            assert server.endpoint in problem["detail"], problem
            await nothing_kept(app)
            assert (await upload.get("/healthz")).status_code == 200


def test_settings_put_the_spool_under_the_data_dir(tmp_path: Path) -> None:
    assert UploadSettings(data_dir=tmp_path).spool_dir == tmp_path / "upload" / "spool"


@pytest.mark.slow
async def test_memory_stays_flat_while_a_large_upload_streams_into_s3(
    tmp_path: Path, s3: S3Server, s3_url: str
) -> None:
    """300 MB as a raw body through the service as a process: a real 1 s MP4 followed by a 300 MB `free` box."""
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

    env = {
        "CATTUBE_DATA_DIR": str(tmp_path / "data"),
        "CATTUBE_ROUTER_URL": f"http://127.0.0.1:{free_port()}",
        "CATTUBE_BLOB_URL": s3_url,
        **{name: value for name, value in os.environ.items() if name.startswith("AWS_")},  # s3_env's
    }
    async with (
        service("services.upload", env) as upload,
        httpx.AsyncClient(base_url=upload.url, timeout=120) as http,
    ):
        assert upload.proc is not None
        response = await http.post("/videos", content=large(), headers={"Content-Type": "video/mp4"})
        assert response.status_code == 202, response.text
        peak_kib = peak_rss_kib(upload.proc.pid)
    info = await s3.bucket(s3_url).stat(f"videos/{response.json()['video_id']}/master.mp4")
    assert info is not None and info.size_bytes == len(clip) + 16 + filler and info.sha256 == digest.hexdigest()
    assert not any((tmp_path / "data" / "upload" / "spool").iterdir())
    # 110 MiB: the process itself (S3 client, the router SDK over aiohttp: ~9 MB of imports since the
    # SDK's default transport) plus flat streaming buffers; a 300 MB body held whole would be far above.
    assert peak_kib < 110 * 1024, f"peak RSS {peak_kib} KiB"
