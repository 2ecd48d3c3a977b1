"""What a client of the upload service reads: status_url leads where a person can follow the video, no
body shows a bucket URI or a server path, and a full disk is a clear 507 that leaves nothing behind."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.blobs import BlobInfo
from services.upload.app import create_app
from services.upload.settings import UploadSettings
from tests.conftest import running
from tests.services.upload.test_api import assert_problem
from tests.services.upload.uploading import bucket_files


async def test_status_url_leads_to_the_store_when_its_address_is_known(
    upload_settings: Callable[..., UploadSettings],
    clip: bytes,
) -> None:
    settings = upload_settings(store_public_url="http://videos.example:8703/")
    async with running(create_app(settings, exit_on_failure=False)) as upload:
        response = await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"})
        assert response.status_code == 202, response.text
        video_id = response.json()["video_id"]
        assert response.json()["status_url"] == f"http://videos.example:8703/videos/{video_id}"
        assert response.headers["location"] == response.json()["status_url"]
        own = (await upload.get(f"/videos/{video_id}")).json()
        assert own["store_url"] == f"http://videos.example:8703/videos/{video_id}"


async def test_no_response_shows_a_bucket_uri_or_server_path(
    upload_settings: Callable[..., UploadSettings],
    clip: bytes,
    tmp_path: Path,
) -> None:
    app = create_app(upload_settings(), exit_on_failure=False)
    async with running(app) as upload:
        accepted = await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"})
        video_id = accepted.json()["video_id"]
        record = await upload.get(f"/videos/{video_id}")
        assert record.status_code == 200
        assert record.json()["master"]["size_bytes"] == len(clip) and "uri" not in record.json()["master"]
        # The router refused the event, with a reason naming the master's location.
        local = tmp_path / "upload" / "bucket" / "videos" / video_id / "master.mp4"
        outbox = app.state.outbox
        await outbox.db.transact(
            lambda conn: conn.execute(
                "UPDATE uploads SET event_error = ? WHERE video_id = ?", f"no room for {local.as_uri()}", video_id
            )
        )
        record = await upload.get(f"/videos/{video_id}")
        for response in (accepted, record):
            assert "file://" not in response.text and str(tmp_path) not in response.text, response.text
        (event,) = await outbox.db.transact(lambda conn: [row[0] for row in conn.fetch("SELECT event FROM outbox")])
        assert local.as_uri() in event  # the event other services read keeps the URI


@pytest.mark.parametrize("step", ["write", "put_file"])
async def test_a_full_disk_is_507_and_leaves_nothing(
    upload_settings: Callable[..., UploadSettings],
    bucket: Path,
    clip: bytes,
    step: str,
) -> None:
    app = create_app(upload_settings(), exit_on_failure=False)
    async with running(app) as upload:
        store = app.state.uploads.store
        real_write, real_put = store.write, store.put_file

        async def write_then_fill(key: str, chunks: AsyncIterable[bytes], **options: Any) -> BlobInfo:
            info: BlobInfo = await real_write(key, chunks, **options)  # part of it reached the disk
            if step == "write":
                raise OSError(errno.ENOSPC, "No space left on device")
            return info

        async def put_full(key: str, path: Path) -> BlobInfo:
            await real_put(key.replace("master", "copy"), path)  # a partial copy is there too
            raise OSError(errno.ENOSPC, "No space left on device")

        store.write = write_then_fill
        if step == "put_file":
            store.put_file = put_full
        response = await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"})
        problem = assert_problem(response, 507)
        assert "no room left" in problem["detail"] and "nothing of it was kept" in problem["detail"]
        assert bucket_files(bucket) == []
        assert await app.state.outbox.unfinished() == []
        assert await app.state.outbox.pending_count() == 0
        assert 'cattube_upload_refused_total{status="507"} 1.0' in (await upload.get("/metrics")).text
