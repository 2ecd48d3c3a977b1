"""The whole stack as processes (`cattube up` in a temp dir), driven over HTTP as a person would."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import av
import httpx
import m3u8
import pytest

from router.client import RouterClient
from services.cli.upload import live_changes
from services.processing.deletions import deletions_queue_name
from tests.e2e.stack import Stack
from tests.media import make_clip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FINAL = {"ready", "failed", "deleted"}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(tmp_path / "data", CATTUBE_SCALE_IN_COOLDOWN_S="1", CATTUBE_MAX_WORKERS="2")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@asynccontextmanager
async def watching(stack: Stack) -> AsyncIterator[AsyncIterator[tuple[str, dict[str, Any]]]]:
    """The store's live stream, listening already (its `ready` event read), closed on exit."""
    async with aclosing(live_changes(stack.url("store"))) as changes:
        await anext(changes)
        yield changes


async def upload(stack: Stack, path: Path, renditions: str = "360p,240p") -> str:
    async with httpx.AsyncClient(timeout=60) as client:
        with path.open("rb") as file:
            response = await client.post(
                f"{stack.url('upload')}/videos",
                data={"title": path.stem, "renditions": renditions},
                files={"file": (path.name, file, "video/mp4")},
                headers=stack.auth("user"),  # what the page and `cattube upload` hold
            )
    assert response.status_code == 202, response.text
    video_id: str = response.json()["video_id"]
    return video_id


async def until(
    changes: AsyncIterator[tuple[str, dict[str, Any]]], ids: set[str], statuses: set[str]
) -> dict[str, Any]:
    """Read the store's live stream until every video in `ids` has one of `statuses`; their last records."""
    seen: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(180):
        async for event, video in changes:
            if event == "video" and video.get("video_id") in ids:
                seen[video["video_id"]] = video
                if all(seen.get(i, {}).get("status") in statuses for i in ids):
                    return seen
    raise AssertionError("the live stream ended")


async def test_three_clips_become_ready_with_their_renditions(stack: Stack, tmp_path: Path) -> None:
    clips = {
        "landscape": make_clip(tmp_path / "landscape.mp4", 640, 360, 2),
        "portrait": make_clip(tmp_path / "portrait.mp4", 640, 360, 2, rotate=90),
        "silent": make_clip(tmp_path / "silent.mp4", 640, 360, 2, audio=False),
    }
    async with watching(stack) as changes:
        ids = {await upload(stack, path): name for name, path in clips.items()}
        final = await until(changes, set(ids), FINAL)
    assert {v["status"] for v in final.values()} == {"ready"}, final
    async with httpx.AsyncClient(timeout=30) as client:
        for video_id, name in ids.items():
            video = (await client.get(f"{stack.url('store')}/videos/{video_id}")).json()
            sizes = {r["name"]: (r["width"], r["height"]) for r in video["renditions"]}
            assert set(sizes) == {"360p", "240p"}
            for rung, (width, height) in sizes.items():
                assert min(width, height) == int(rung[:-1])
                assert (height > width) == (name == "portrait")
            # Playback with a byte range, as a player seeks.
            url = video["renditions"][0]["url"]
            ranged = await client.get(url, headers={"Range": "bytes=0-99"})
            assert ranged.status_code == 206 and len(ranged.content) == 100
            assert ranged.headers["content-range"].startswith("bytes 0-99/")
            poster = await client.get(video["poster_url"])
            assert poster.status_code == 200 and poster.content[:2] == b"\xff\xd8"
            # Adaptive streaming: the master playlist lists both rungs, and each plays whole over HTTP.
            master = await client.get(video["hls_url"])
            assert master.headers["content-type"] == "application/vnd.apple.mpegurl"
            variants = {v.uri: v.stream_info.resolution for v in m3u8.M3U8(master.text, strict=True).playlists}
            assert variants == {f"{rung}/index.m3u8": size for rung, size in sizes.items()}
            for uri, size in variants.items():
                frames = await asyncio.to_thread(decoded_frames, urljoin(video["hls_url"], uri))
                assert frames == [size] * 50, uri  # 2 s at 25 fps


def decoded_frames(url: str) -> list[tuple[int, int]]:
    """Every video frame of an HLS media playlist, read over HTTP as a player would (PyAV's HLS demuxer)."""
    with av.open(url) as container:
        return [(frame.width, frame.height) for frame in container.decode(video=0)]


async def test_delete_removes_every_blob(stack: Stack, tmp_path: Path) -> None:
    async with watching(stack) as changes:
        video_id = await upload(stack, make_clip(tmp_path / "gone.mp4", 320, 240, 1))
        await until(changes, {video_id}, FINAL)
    bucket = stack.data_dir / "bucket" / "videos" / video_id
    assert any(bucket.iterdir()) and any((bucket / "hls").rglob("*.m4s"))
    async with RouterClient(stack.url("router"), token=stack.tokens["service"]) as router:
        async with httpx.AsyncClient() as client:
            processing = await client.get(f"{stack.url('processing')}/autoscaler", headers=stack.auth("service"))
            deletions = deletions_queue_name(processing.json()["instance"])  # the processing instance's own queue
        before = await router.stats(deletions)
        async with httpx.AsyncClient() as client:
            deleted = await client.delete(f"{stack.url('store')}/videos/{video_id}", headers=stack.auth("user"))
            assert deleted.status_code == 202
            assert (await client.get(f"{stack.url('store')}/videos/{video_id}")).status_code == 404
        # The processing service acks the deletion once the blobs are gone: follow its queue, no polling.
        async with asyncio.timeout(60), aclosing(router.watch_stats(deletions)) as watch:
            async for stats in watch:
                if stats.delivered_total > before.delivered_total:
                    break
    assert not bucket.exists()


async def test_a_router_killed_mid_run_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    first = await upload(stack, make_clip(tmp_path / "a.mp4", 320, 240, 2))
    os.kill(stack.pid_of("router"), signal.SIGKILL)  # `cattube up` restarts it
    second = await upload(stack, make_clip(tmp_path / "b.mp4", 320, 240, 2))  # the outbox holds its event
    await stack.wait_serving({"router"}, starts=2)
    async with watching(stack) as changes, httpx.AsyncClient() as client:
        current = {i: (await client.get(f"{stack.url('store')}/videos/{i}")).json() for i in (first, second)}
        pending = {i for i, v in current.items() if v.get("status") not in FINAL}
        if pending:
            current.update(await until(changes, pending, FINAL))
    assert {v["status"] for v in current.values()} == {"ready"}, current


async def test_a_master_briefly_unreadable_ends_ready_after_a_retry(stack: Stack, tmp_path: Path) -> None:
    processing = stack.url("processing")
    async with httpx.AsyncClient(timeout=30) as client, watching(stack) as changes:
        paused = await client.put(f"{processing}/autoscaler", json={"max_workers": 0}, headers=stack.auth("admin"))
        assert paused.status_code == 200, paused.text
        video_id = await upload(stack, make_clip(tmp_path / "flaky.mp4", 320, 240, 1))
        await until(changes, {video_id}, {"uploaded"})
        (master,) = (stack.data_dir / "bucket" / "videos" / video_id).glob("master.*")
        aside = master.with_name("aside")
        master.rename(aside)
        await client.put(f"{processing}/autoscaler", json={"max_workers": 2}, headers=stack.auth("admin"))
        failed = (await until(changes, {video_id}, {"failed", "ready"}))[video_id]
        assert failed["status"] == "failed" and failed["error"]
        aside.rename(master)
        retried = await client.post(f"{stack.url('store')}/videos/{video_id}/retry", headers=stack.auth("user"))
        assert retried.status_code == 202, retried.text
        assert (await until(changes, {video_id}, {"ready"}))[video_id]["status"] == "ready"


async def test_tokens_and_page_link_survive_a_restart(stack: Stack) -> None:
    """A bookmarked `/#token=` link and a script's token keep working after `cattube up` runs again."""
    before = stack.tokens
    assert len(set(before.values())) == 3
    assert f"/#token={before['user']}" in "\n".join(stack.log)
    assert before["admin"] not in "\n".join(stack.log)  # the admin token is never printed
    await stack.stop()
    await stack.start()
    await stack.wait_serving({"router", "upload", "processing", "store"}, starts=2)
    assert stack.tokens == before
    async with httpx.AsyncClient() as client:
        unknown = await client.get(f"{stack.url('upload')}/videos/nobody", headers=stack.auth("user"))
        assert unknown.status_code == 404  # past authentication with the old user token
        page_token = await client.put(
            f"{stack.url('processing')}/autoscaler", json={"max_workers": 0}, headers=stack.auth("user")
        )
        assert page_token.status_code == 403


async def test_a_clip_becomes_ready_with_the_services_on_postgresql(tmp_path: Path, database_url: str) -> None:
    """Upload, processing and the store keep their tables in PostgreSQL (one database, a schema each)."""
    services_on_postgres = {
        f"CATTUBE_{name}_DATABASE_URL": database_url for name in ("UPLOAD", "PROCESSING", "STORE")
    }  # the router keeps its SQLite file: its PostgreSQL store is not there yet
    on_postgres = Stack(tmp_path / "data", CATTUBE_MAX_WORKERS="1", **services_on_postgres)
    await on_postgres.start()
    try:
        async with watching(on_postgres) as changes:
            video_id = await upload(on_postgres, make_clip(tmp_path / "cat.mp4", 640, 360, 1))
            final = await until(changes, {video_id}, FINAL)
        assert final[video_id]["status"] == "ready", final
        async with httpx.AsyncClient(timeout=30) as client:
            video = (await client.get(f"{on_postgres.url('store')}/videos/{video_id}")).json()
            assert {r["name"] for r in video["renditions"]} == {"360p", "240p"}
    finally:
        await on_postgres.stop()
    assert not (tmp_path / "data" / "store" / "catalog.db").exists()  # the catalog was never a SQLite file
