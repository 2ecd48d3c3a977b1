"""POST /videos and GET /videos/{id} in-process: what is accepted, what is refused, and what is left behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import ClientDisconnect

from router.client import RouterClient
from services.common.db import SQLiteDatabase
from services.upload.app import create_app
from services.upload.outbox import MIGRATIONS, Outbox
from services.upload.settings import UploadSettings
from tests.conftest import running
from tests.media import make_clip
from tests.replicas import DOWN, Replicas
from tests.services.upload.uploading import bucket_files, chunks_of, multipart


@pytest.fixture(scope="session")
def webm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_clip(tmp_path_factory.mktemp("clips") / "cat.webm", 160, 96, 0.5, fmt="webm").read_bytes()


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status and problem["detail"]
    if field is not None:
        assert [e["field"] for e in problem["errors"]] == [field], problem
    return problem


async def record(client: httpx.AsyncClient, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"video_id", "status_url"}
    assert body["status_url"] == f"http://testserver/videos/{body['video_id']}"
    assert response.headers["location"] == body["status_url"]
    found = await client.get(f"/videos/{body['video_id']}")
    assert found.status_code == 200
    result: dict[str, Any] = found.json()
    return result


# Accepted


async def test_multipart_upload(upload: httpx.AsyncClient, bucket: Path, clip: bytes) -> None:
    response = await upload.post(
        "/videos",
        files={"file": ("../../etc/passwd.m3u8", clip, "text/plain")},
        data={"title": " Whiskers\ton the\x07 beach\u202e\n", "renditions": "720P, 360p,720p"},
    )
    found = await record(upload, response)
    video_id = found["video_id"]
    assert found["title"] == "Whiskers on the beach"
    assert found["renditions"] == ["720p", "360p"]
    assert found["master"] == {  # no bucket URI: the client has no business with the server's storage
        "size_bytes": len(clip),
        "sha256": hashlib.sha256(clip).hexdigest(),
        "content_type": "video/mp4",
    }
    assert found["probe"]["width"] == 160 and found["probe"]["video_codec"] == "h264"
    assert found["event"]["status"] == "pending" and found["event"]["id"] == video_id
    assert bucket_files(bucket) == [f"videos/{video_id}/master.mp4"]


async def test_raw_upload_with_query_parameters(upload: httpx.AsyncClient, bucket: Path, clip: bytes) -> None:
    response = await upload.post(
        "/videos",
        params={"title": "Raw cat", "renditions": "360p,1080p"},
        content=chunks_of(clip, 1000),
        headers={"Content-Type": "video/quicktime"},
    )
    found = await record(upload, response)
    assert (found["title"], found["renditions"]) == ("Raw cat", ["360p", "1080p"])
    assert found["master"]["sha256"] == hashlib.sha256(clip).hexdigest()
    assert found["master"]["size_bytes"] == len(clip)


async def test_defaults_and_fields_after_the_file(upload: httpx.AsyncClient, clip: bytes) -> None:
    content_type, body = multipart([("renditions", "")], ("Whiskers, take 3.mp4", chunks_of(clip)), file_first=True)
    found = await record(upload, await upload.post("/videos", content=body, headers={"Content-Type": content_type}))
    assert found["title"] == "Whiskers, take 3"
    assert found["renditions"] == ["1080p", "720p", "480p", "360p"]
    raw = await upload.post("/videos", content=clip, headers={"Content-Type": "application/octet-stream"})
    assert (await record(upload, raw))["title"] == "Untitled"


async def test_the_extension_comes_from_the_content(upload: httpx.AsyncClient, bucket: Path, webm: bytes) -> None:
    response = await upload.post("/videos", files={"file": ("cat.mp4", webm, "video/mp4")})
    found = await record(upload, response)
    assert found["master"]["content_type"] == "video/webm"
    assert bucket_files(bucket) == [f"videos/{found['video_id']}/master.webm"]


async def test_the_event_reaches_the_router(
    upload_settings: Callable[..., UploadSettings], router_app: FastAPI, clip: bytes
) -> None:
    settings = upload_settings()
    transport = httpx.ASGITransport(app=router_app)
    async with RouterClient("http://router", transport=transport) as router:
        await router.ensure_subscription(
            "uploads", pattern={"type": ["cattube.video.uploaded"]}, target={"queue": {}}, start="earliest"
        )
        async with running(create_app(settings, exit_on_failure=False, router_transport=transport)) as upload:
            response = await upload.post("/videos", files={"file": ("cat.mp4", clip)}, data={"title": "T"})
            found = await record(upload, response)
            (message,) = await router.queue("uploads").receive(wait_s=5)
        # Shutting down let the relay finish: the outbox now knows the event went out.
    event = message.event
    video_id = found["video_id"]
    assert (event["id"], event["source"], event["partitionkey"]) == (video_id, "cattube/upload", video_id)
    assert event["type"] == "cattube.video.uploaded"
    assert event["data"]["master"]["uri"].endswith(f"/videos/{video_id}/master.mp4")
    assert event["data"] == {
        "video_id": video_id,
        "title": "T",
        "master": {"uri": event["data"]["master"]["uri"], **found["master"]},
        "probe": found["probe"],
        "renditions": found["renditions"],
    }
    outbox = Outbox(SQLiteDatabase(settings.outbox_file, MIGRATIONS))
    await outbox.open()
    after = await outbox.get(video_id)
    await outbox.close()
    assert after is not None and after["event"]["status"] == "published"
    assert after["event"]["sequence"] == message.sequence


# Refused, leaving nothing behind


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"title": "x" * 201}, "title"),
        ({"renditions": "720p,4k"}, "renditions"),
        ({"renditions": "720p;360p"}, "renditions"),
    ],
)
async def test_bad_query_parameters(
    upload: httpx.AsyncClient, bucket: Path, clip: bytes, params: dict[str, str], field: str
) -> None:
    response = await upload.post("/videos", params=params, content=clip, headers={"Content-Type": "video/mp4"})
    problem = assert_problem(response, 422, field)
    assert "2160p, 1440p" in problem["detail"] or "200 characters" in problem["detail"]
    assert bucket_files(bucket) == []


@pytest.mark.parametrize(
    ("fields", "file_first", "field"),
    [
        ([("title", "x" * 201)], False, "title"),
        ([("title", "x" * 201)], True, "title"),
        ([("renditions", "8k")], True, "renditions"),
        ([("title", "a"), ("title", "b")], False, "title"),
        ([("owner", "mallory")], False, "form.owner"),
    ],
)
async def test_bad_form_fields(
    upload: httpx.AsyncClient, bucket: Path, clip: bytes, fields: list[tuple[str, str]], file_first: bool, field: str
) -> None:
    content_type, body = multipart(fields, ("cat.mp4", chunks_of(clip)), file_first=file_first)
    assert_problem(await upload.post("/videos", content=body, headers={"Content-Type": content_type}), 422, field)
    assert bucket_files(bucket) == []


async def test_form_text_must_be_utf8(upload: httpx.AsyncClient, bucket: Path, clip: bytes) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cat.mp4"\r\n\r\n'.encode()
        + clip
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="title"\r\n\r\n'.encode()
        + b"\xff\xfe\r\n"
        + f"--{boundary}--\r\n".encode()
    )
    response = await upload.post(
        "/videos", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert assert_problem(response, 422, "title")["errors"][0]["expected"] == "UTF-8 text"
    assert bucket_files(bucket) == []


async def test_malformed_forms(upload: httpx.AsyncClient, bucket: Path, clip: bytes) -> None:
    content_type, body = multipart([("title", "no file")])
    assert_problem(await upload.post("/videos", content=body, headers={"Content-Type": content_type}), 422, "file")
    content_type, body = multipart([], ("cat.mp4", chunks_of(clip)), close=False)
    response = await upload.post("/videos", content=body, headers={"Content-Type": content_type})
    assert "closing boundary" in assert_problem(response, 400, "body")["detail"]
    files = [("file", ("a.mp4", clip)), ("file", ("b.mp4", clip))]
    assert_problem(await upload.post("/videos", files=files), 422, "file")
    no_boundary = await upload.post("/videos", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert_problem(no_boundary, 422, "header.Content-Type")
    assert bucket_files(bucket) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
async def test_other_content_types(upload: httpx.AsyncClient, clip: bytes, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await upload.post("/videos", content=clip, headers=headers)
    assert "multipart/form-data" in assert_problem(response, 415, "header.Content-Type")["detail"]


async def test_empty_uploads(upload: httpx.AsyncClient, bucket: Path) -> None:
    assert_problem(await upload.post("/videos", content=b"", headers={"Content-Type": "video/mp4"}), 400, "file")
    assert_problem(await upload.post("/videos", files={"file": ("empty.mp4", b"")}), 400, "file")
    assert bucket_files(bucket) == []


async def test_over_the_limit(upload_settings: Callable[..., UploadSettings], bucket: Path) -> None:
    limit = 256 * 1024
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            sent += 64 * 1024
            yield bytes(64 * 1024)

    async with running(create_app(upload_settings(max_upload_bytes=limit), exit_on_failure=False)) as upload:
        # Declared too large: refused before a byte is read.
        declared = await upload.post("/videos", content=b"x" * (limit + 1), headers={"Content-Type": "video/mp4"})
        assert "at most 262144 bytes" in assert_problem(declared, 413, "body")["detail"]
        # Streamed without a length: refused as soon as the limit is crossed.
        for content_type, body in [("video/mp4", endless()), multipart([], ("big.mp4", endless()))]:
            sent = 0
            response = await upload.post("/videos", content=body, headers={"Content-Type": content_type})
            assert_problem(response, 413, "body")
            assert sent <= limit + 2 * 1024 * 1024  # the last piece of ~1 MiB that crossed it, not the whole body
            assert bucket_files(bucket) == []
        metrics = (await upload.get("/metrics")).text
    assert 'cattube_upload_refused_total{status="413"} 3.0' in metrics


async def test_probe_refusals_remove_the_video_directory(upload: httpx.AsyncClient, bucket: Path, clip: bytes) -> None:
    text = await upload.post("/videos", content=b"Whiskers on the beach\n" * 50, headers={"Content-Type": "video/mp4"})
    assert "text" in assert_problem(text, 415, "file")["detail"]
    truncated = await upload.post("/videos", files={"file": ("cut.mp4", clip[: len(clip) // 2])})
    assert "truncated" in assert_problem(truncated, 422, "file")["detail"]
    assert bucket_files(bucket) == []
    assert not any((bucket / "videos").iterdir())


async def test_a_client_that_goes_away_leaves_nothing(
    upload_settings: Callable[..., UploadSettings], bucket: Path, clip: bytes
) -> None:
    async def cut_off() -> AsyncIterator[bytes]:
        yield clip[:1000]
        yield bytes(2 << 20)  # past one write piece: the bucket has a partial object by now
        raise ClientDisconnect  # what Starlette's request.stream() raises when the connection drops

    app = create_app(upload_settings(), exit_on_failure=False)
    async with running(app) as upload:
        with pytest.raises(ClientDisconnect):
            await app.state.uploads.receive("video/mp4", cut_off())
        metrics = (await upload.get("/metrics")).text
    assert 'cattube_upload_refused_total{status="aborted"} 1.0' in metrics
    assert bucket_files(bucket) == []


async def test_unknown_video(upload: httpx.AsyncClient) -> None:
    assert_problem(await upload.get("/videos/nope"), 404)


# Around the API


async def test_operations_endpoints(upload: httpx.AsyncClient, clip: bytes) -> None:
    assert (await upload.get("/healthz")).json() == {"status": "ok"}
    assert (await upload.get("/readyz")).json() == {"status": "ready"}
    await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"})
    await upload.post("/videos", content=b"text", headers={"Content-Type": "video/mp4"})
    metrics = (await upload.get("/metrics")).text
    assert "cattube_upload_accepted_total 1.0" in metrics
    assert f"cattube_upload_accepted_bytes_total {float(len(clip))}" in metrics
    assert 'cattube_upload_refused_total{status="415"} 1.0' in metrics
    assert "cattube_upload_outbox_pending 1.0" in metrics
    docs = (await upload.get("/openapi.json")).json()
    assert set(docs["paths"]["/videos"]["post"]["requestBody"]["content"]) >= {"multipart/form-data", "video/*"}


async def test_token_and_cors(upload_settings: Callable[..., UploadSettings], clip: bytes) -> None:
    app = create_app(upload_settings(token="s3cret"), exit_on_failure=False)
    async with running(app) as upload:
        refused = await upload.post("/videos", content=clip, headers={"Content-Type": "video/mp4"})
        assert_problem(refused, 401, "header.Authorization")
        headers = {"Content-Type": "video/mp4", "Authorization": "Bearer s3cret"}
        assert (await upload.post("/videos", content=clip, headers=headers)).status_code == 202
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        store = await upload.options("/videos", headers={"Origin": "http://localhost:8703", **preflight})
        assert store.status_code == 200
        assert store.headers["access-control-allow-origin"] == "http://localhost:8703"
        other = await upload.options("/videos", headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers


async def test_the_user_token_uploads_and_reads(upload_settings: Callable[..., UploadSettings], clip: bytes) -> None:
    settings = upload_settings(token="admin-t", service_token="service-t", user_token="user-t")
    async with running(create_app(settings, exit_on_failure=False)) as upload:
        headers = {"Content-Type": "video/mp4", "Authorization": "Bearer user-t"}
        accepted = await upload.post("/videos", content=clip, headers=headers)
        assert accepted.status_code == 202
        status = await upload.get(f"/videos/{accepted.json()['video_id']}", headers={"Authorization": "Bearer user-t"})
        assert status.status_code == 200
        metrics = await upload.get("/metrics", headers={"Authorization": "Bearer user-t"})
        assert metrics.status_code == 403 and metrics.json()["scope"] == "service"
        admin = {"Content-Type": "video/mp4", "Authorization": "Bearer admin-t"}
        assert (await upload.post("/videos", content=clip, headers=admin)).status_code == 202


async def test_uploads_cut_short_by_a_crash_are_swept_at_start(
    upload_settings: Callable[..., UploadSettings], bucket: Path
) -> None:
    settings = upload_settings()
    outbox = Outbox(SQLiteDatabase(settings.outbox_file, MIGRATIONS))
    await outbox.open()
    await outbox.begin("interrupted")
    await outbox.close()
    leftover = bucket / "videos" / "interrupted" / "incoming"
    leftover.mkdir(parents=True)
    (leftover / ".master.upload.0123.tmp").write_bytes(b"partial")
    async with running(create_app(settings, exit_on_failure=False)) as upload:
        assert (await upload.get("/videos/interrupted")).status_code == 404
    assert bucket_files(bucket) == []
    outbox = Outbox(SQLiteDatabase(settings.outbox_file, MIGRATIONS))
    await outbox.open()
    assert await outbox.unfinished() == []
    await outbox.close()


def test_settings_refuse_unknown_default_renditions() -> None:
    with pytest.raises(ValueError, match="renditions"):
        UploadSettings(default_renditions="720p,4k")
    assert UploadSettings(default_renditions="360p, 720p").default_rendition_names == ("360p", "720p")
    assert json.loads(json.dumps(UploadSettings().allowed_origins)) == [
        "http://127.0.0.1:8703",
        "http://localhost:8703",
    ]


async def test_with_two_routers_listed_the_event_goes_through_the_one_that_answers(
    upload_settings: Callable[..., UploadSettings], router_app: FastAPI, clip: bytes
) -> None:
    replicas = Replicas({"http://down": DOWN, "http://router": httpx.ASGITransport(app=router_app)})
    settings = upload_settings(router_url="http://down,http://router")
    async with RouterClient("http://router", transport=httpx.ASGITransport(app=router_app)) as router:
        await router.ensure_subscription(
            "uploads", pattern={"type": ["cattube.video.uploaded"]}, target={"queue": {}}, start="earliest"
        )
        async with running(create_app(settings, exit_on_failure=False, router_transport=replicas)) as upload:
            found = await record(upload, await upload.post("/videos", files={"file": ("cat.mp4", clip)}))
            (message,) = await router.queue("uploads").receive(wait_s=5)
    assert message.event["id"] == found["video_id"]
    assert replicas.seen[:2] == ["http://down", "http://router"]


async def test_a_missing_bucket_is_named_by_readyz_and_the_service_stays_up(
    upload_settings: Callable[..., UploadSettings], s3_env: None
) -> None:
    missing = "cattube-test-no-such-bucket"
    app = create_app(upload_settings(blob_url=f"s3://{missing}/media"), exit_on_failure=False)
    async with running(app) as api:
        await asyncio.wait_for(app.state.blob_check.answered.wait(), 30)
        assert (await api.get("/healthz")).status_code == 200
        ready = await api.get("/readyz")
        assert ready.status_code == 503 and f"the bucket '{missing}' does not exist" in ready.json()["detail"]
