"""What anyone may read from the store, and what it must never show: internal paths, links built from a
client's Host header, deleted videos' details; plus strict ranges, `retryable` and one timestamp shape."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.blobs import video_key
from services.store.api import _sse
from services.store.live import Change
from services.store.records import Video
from tests.services.store.conftest import event, uploaded
from tests.services.store.test_api import MP4, problem, ready_video

MILLISECONDS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
AUTH = {"Authorization": "Bearer s3cret"}


async def test_every_timestamp_is_milliseconds_and_z(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        scaled = {"from": 0, "to": 1, "backlog": 1, "in_flight": 0, "reason": "1 job waiting"}
        await store.deliver(event("cattube.processing.scaled", scaled))
        video = (await store.api.get("/videos/v1")).json()
        (listed,) = (await store.api.get("/videos")).json()["items"]
        (point,) = (await store.api.get("/autoscaler/history")).json()["items"]
        (announced,) = await store.published("cattube.video.ready")
        stamps = [video["created_at"], video["updated_at"], listed["updated_at"], point["at"], announced["time"]]
        stamps.append(announced["data"]["updated_at"])
        assert all(MILLISECONDS_Z.match(stamp) for stamp in stamps), stamps


async def test_range_positions_are_ascii_digits_of_bounded_length(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        url = "/videos/v1/renditions/720p"
        huge = await store.api.get(url, headers={"Range": "bytes=0-" + "9" * 5000})
        assert huge.status_code == 206 and huge.content == MP4  # a last position past the end: up to the end
        assert (await store.api.get(url, headers={"Range": "bytes=-" + "9" * 5000})).content == MP4
        # \xb2 is "²" (latin-1, as Starlette decodes headers), which Python's isdigit() takes for a digit.
        for header in (b"bytes=" + b"9" * 5000 + b"-", b"bytes=0-\xb2", "bytes=\u0661-5".encode(), b"bytes=0-1\xb2"):
            refused = await store.api.get(url, headers={"Range": header})
            assert "header.Range" in problem(refused, 416)["detail"]
            assert len(refused.text) < 1000  # the header is not echoed whole


async def test_links_come_from_the_public_url_not_the_host_header(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)
        evil = {"Host": "evil.example"}
        video = (await store.api.get("/videos/v1", headers=evil)).json()
        (listed,) = (await store.api.get("/videos", headers=evil)).json()["items"]
        links = [video["poster_url"], *(r["url"] for r in video["renditions"] + listed["renditions"])]
        assert links and all(link.startswith("http://store/videos/v1/") for link in links), links


async def test_deleted_videos_are_bare_ids_without_the_token(make_store: Callable[..., Any]) -> None:
    async with make_store(token="s3cret") as store:
        await ready_video(store)
        assert (await store.api.delete("/videos/v1", headers=AUTH)).status_code == 202
        (anonymous,) = (await store.api.get("/videos", params={"status": "deleted"})).json()["items"]
        assert anonymous["video_id"] == "v1" and anonymous["status"] == "deleted"
        assert anonymous["title"] is None and anonymous["duration_s"] is None and anonymous["requested"] == []
        assert anonymous["created_at"] is None and "Whiskers" not in json.dumps(anonymous)
        (known,) = (await store.api.get("/videos", params={"status": "deleted"}, headers=AUTH)).json()["items"]
        assert known["title"] == "Whiskers on the beach"
        # The live stream is open to anyone: a deletion goes out as the id alone.
        settings = store.app.state.settings
        tombstone = Video("v2", status="deleted", title="Secret cat", probe={"duration_s": 3.0}, version=9)
        sent = _sse(Change("video", video=tombstone), settings)
        assert '"video_id": "v2"' in sent and '"status": "deleted"' in sent and "Secret cat" not in sent


async def test_no_client_facing_body_shows_a_server_path(make_store: Callable[..., Any], tmp_path: Path) -> None:
    async with make_store() as store:
        master = store.bucket.uri(video_key("v1", "master.mp4"))
        local = str(tmp_path / "data" / "bucket" / "videos" / "v1" / "master.mp4")
        await store.deliver(uploaded("v1", store.bucket))
        reason = f"The master {master!r} could not be read ([Errno 2] No such file or directory: '{local}')."
        failed = {"video_id": "v1", "attempt": 1, "permanent": True, "reason": reason}
        await store.deliver(event("cattube.transcode.failed", failed))
        outside = {"video_id": "v2", "renditions": [{"name": "720p", "uri": "file:///etc/secret/720p.mp4"}]}
        await store.deliver(event("cattube.transcode.completed", outside))
        bodies = [
            await store.api.get("/videos/v1"),
            await store.api.get("/videos"),
            await store.api.get("/videos/v2/renditions/720p"),
            await store.api.get("/videos/v2/poster"),
        ]
        assert (await store.api.get("/videos/v1")).json()["error"].startswith("The master '<bucket object>'")
        for response in bodies:
            assert "file://" not in response.text and str(tmp_path) not in response.text, response.text
            assert "/etc/secret" not in response.text
        (announced,) = await store.published("cattube.video.failed")
        assert announced["data"]["master"]["uri"] == master  # events between services keep their URIs


async def test_retryable_says_what_retry_accepts(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        failure = {"attempt": 1, "permanent": True, "reason": "No video frame could be decoded."}
        await store.deliver(uploaded("known", store.bucket))
        await store.deliver(event("cattube.transcode.failed", {"video_id": "known", **failure}))
        # A failure heard of before (or without) the upload: the store cannot rerun it.
        await store.deliver(event("cattube.transcode.failed", {"video_id": "orphan", **failure}))
        # A master that can never become what was asked: the same request would fail the same way.
        await store.deliver(uploaded("rejected", store.bucket))
        rejected = {"video_id": "rejected", **failure, "input_rejected": True}
        await store.deliver(event("cattube.transcode.failed", rejected))
        await ready_video(store, "fine")
        records = {v["video_id"]: v for v in (await store.api.get("/videos")).json()["items"]}
        assert {k: v["retryable"] for k, v in records.items()} == {
            "known": True, "orphan": False, "rejected": False, "fine": False,
        }  # fmt: skip
        problem(await store.api.post("/videos/orphan/retry"), 409)
        refusal = problem(await store.api.post("/videos/rejected/retry"), 409)["detail"]
        assert "No video frame could be decoded" in refusal and "upload it again" in refusal
        assert (await store.api.get("/videos/rejected")).json()["status"] == "failed"
        retried = await store.api.post("/videos/known/retry")
        assert retried.status_code == 202 and retried.json()["retryable"] is False
