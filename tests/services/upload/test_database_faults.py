"""The upload service on PostgreSQL when the server goes away: 503 problem+json keeping nothing, then back by itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from services.upload.app import create_app
from services.upload.settings import UploadSettings
from tests.conftest import running
from tests.services.upload.uploading import bucket_files
from tests.stoppable_postgres import stoppable_postgres


async def post(upload: httpx.AsyncClient, clip: bytes) -> httpx.Response:
    return await upload.post("/videos", content=clip, headers={"content-type": "video/mp4"})


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "upload outbox database" in response.json()["detail"]


async def test_uploads_are_refused_while_the_server_is_away_and_taken_once_it_is_back(
    upload_settings: Callable[..., UploadSettings], clip: bytes, bucket: Path
) -> None:
    async with stoppable_postgres() as server:
        await server.stop()
        app = create_app(upload_settings(database_url=server.url), exit_on_failure=False)
        async with running(app) as upload:  # starts without its database: no crash, no crash loop
            assert_unavailable(await post(upload, clip))
            assert bucket_files(bucket) == []  # refused before a byte was stored
            ready = await upload.get("/readyz")
            assert ready.status_code == 503 and "upload outbox database" in ready.json()["detail"]

            await server.start()
            first = await post(upload, clip)
            assert first.status_code == 202, first.text
            assert (await upload.get("/readyz")).status_code == 200

            await server.stop()  # and again, under a running service
            assert_unavailable(await post(upload, clip))
            assert_unavailable(await upload.get(f"/videos/{first.json()['video_id']}"))
            await server.start()
            assert (await post(upload, clip)).status_code == 202
            assert (await upload.get(f"/videos/{first.json()['video_id']}")).status_code == 200
        files = bucket_files(bucket)
        assert len(files) == 2 and all(name.endswith("/master.mp4") for name in files), files
