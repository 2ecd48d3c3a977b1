"""HLS playback through the store in-process: the record's `hls_url`, playlists and segments with their media types,
ranges and caching, 404s for what is not there, and a catalog from before HLS taking the new field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.blobs import video_key
from services.common.db import Migrations, SQLiteDatabase
from services.common.outbox import OUTBOX
from services.store.tables import CATALOG
from tests.services.store.conftest import Store, completed, uploaded
from tests.services.store.test_api import _chunks, problem, ready_video

VERSION = "0123456789ab"
MASTER = b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=900000,RESOLUTION=1280x720\n720p/index.m3u8\n"
MEDIA = b'#EXTM3U\n#EXT-X-MAP:URI="init.mp4"\n#EXTINF:4.0,\nseg-00000.m4s\n#EXT-X-ENDLIST\n'
INIT = b"\x00\x00\x00\x18ftypiso6" + bytes(16)
SEGMENT = bytes(range(256)) * 20  # 5120 bytes standing in for a media segment
BASE = f"/videos/v1/hls/{VERSION}"
IMMUTABLE = "public, max-age=31536000, immutable"


async def hls_video(store: Store, video_id: str = "v1") -> None:
    """A ready video whose completed event names an HLS package, and that package in the bucket."""
    files = {
        ("master.m3u8",): MASTER,
        ("720p", "index.m3u8"): MEDIA,
        ("720p", "init.mp4"): INIT,
        ("720p", "seg-00000.m4s"): SEGMENT,
    }
    for parts, body in files.items():
        await store.bucket.write(video_key(video_id, "hls", VERSION, *parts), _chunks(body))
    assert (await store.deliver(uploaded(video_id, store.bucket))).status_code == 204
    assert (await store.deliver(completed(video_id, store.bucket, hls_version=VERSION))).status_code == 204


async def test_the_record_and_the_ready_event_carry_the_playlist(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await hls_video(store)
        video = (await store.api.get("/videos/v1")).json()
        assert video["hls_url"] == f"http://store{BASE}/master.m3u8"
        (ready,) = await store.published("cattube.video.ready")
        assert ready["data"]["hls_url"] == video["hls_url"]
        assert ready["data"]["hls_uri"] == store.bucket.uri(video_key("v1", "hls", VERSION, "master.m3u8"))


async def test_the_playlist_is_kept_on_postgresql_too(make_store: Callable[..., Any], database_url: str) -> None:
    async with make_store(database_url=database_url) as store:
        await hls_video(store)
        assert (await store.api.get("/videos/v1")).json()["hls_url"] == f"http://store{BASE}/master.m3u8"
        assert (await store.api.get(f"{BASE}/720p/seg-00000.m4s")).content == SEGMENT


async def test_a_video_made_before_hls_has_no_playlist_and_plays_its_mp4s(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await ready_video(store)  # a completed event without `hls`, as processing sent before
        video = (await store.api.get("/videos/v1")).json()
        assert video["status"] == "ready" and video["hls_url"] is None
        assert "no HLS playlist" in problem(await store.api.get(f"{BASE}/master.m3u8"), 404)["detail"]
        assert (await store.api.get("/videos/v1/renditions/720p")).status_code == 200


async def test_playlists_are_mpegurl_with_a_short_cache(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await hls_video(store)
        for url, body in ((f"{BASE}/master.m3u8", MASTER), (f"{BASE}/720p/index.m3u8", MEDIA)):
            response = await store.api.get(url)
            assert response.status_code == 200 and response.content == body, url
            assert response.headers["content-type"] == "application/vnd.apple.mpegurl"
            assert response.headers["cache-control"] == "public, max-age=60"


async def test_segments_are_immutable_and_served_by_range(make_store: Callable[..., Any]) -> None:
    async with make_store() as store:
        await hls_video(store)
        init = await store.api.get(f"{BASE}/720p/init.mp4")
        assert init.status_code == 200 and init.content == INIT and init.headers["content-type"] == "video/mp4"
        assert init.headers["cache-control"] == IMMUTABLE

        url = f"{BASE}/720p/seg-00000.m4s"
        whole = await store.api.get(url)
        assert whole.status_code == 200 and whole.content == SEGMENT
        assert whole.headers["content-type"] == "video/iso.segment" and whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["cache-control"] == IMMUTABLE
        part = await store.api.get(url, headers={"Range": "bytes=100-1123"})
        assert part.status_code == 206 and part.content == SEGMENT[100:1124]
        assert part.headers["content-range"] == f"bytes 100-1123/{len(SEGMENT)}"
        assert part.headers["cache-control"] == IMMUTABLE
        head = await store.api.head(url)
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(SEGMENT))
        unchanged = await store.api.get(url, headers={"If-None-Match": whole.headers["etag"]})
        assert unchanged.status_code == 304 and unchanged.headers["cache-control"] == IMMUTABLE
        problem(await store.api.get(url, headers={"Range": "bytes=99999-"}), 416)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/videos/v1/hls/.hidden/master.m3u8", 422),
        (f"{BASE}/720p/seg-1.ts", 422),
        (f"{BASE}/720p/master.m3u8", 422),
        (f"{BASE}/huge/index.m3u8", 422),
        (f"{BASE}/720p/..%2Fmaster.m3u8", 404),  # a slash, even escaped, is never part of a name: no such route
    ],
)
async def test_names_outside_the_package_layout_are_refused(
    make_store: Callable[..., Any], path: str, status: int
) -> None:
    async with make_store() as store:
        await hls_video(store)
        problem(await store.api.get(path), status)


async def test_what_the_bucket_lacks_is_404_and_a_deleted_video_has_no_playlist(
    make_store: Callable[..., Any],
) -> None:
    async with make_store() as store:
        await hls_video(store)
        assert "missing" in problem(await store.api.get(f"{BASE}/720p/seg-00001.m4s"), 404)["detail"]
        problem(await store.api.get(f"{BASE}/360p/index.m3u8"), 404)
        problem(await store.api.get("/videos/v1/hls/fedcba987654/master.m3u8"), 404)  # another version
        problem(await store.api.get("/videos/nobody/hls/0123456789ab/master.m3u8"), 404)
        assert (await store.api.delete("/videos/v1")).status_code == 202
        assert "deleted" in problem(await store.api.get(f"{BASE}/master.m3u8"), 404)["detail"]
        problem(await store.api.get(f"{BASE}/720p/seg-00000.m4s"), 404)


async def test_a_catalog_from_before_hls_gains_the_column_at_start(
    make_store: Callable[..., Any], tmp_path: Path
) -> None:
    before_hls = Migrations("catalog", sqlite=CATALOG.sqlite[:3], postgres=CATALOG.postgres[:2])
    older = SQLiteDatabase(tmp_path / "data" / "store" / "catalog.db", [before_hls, OUTBOX])
    await older.open()
    await older.close()
    async with make_store() as store:
        assert store.app.state.catalog.db.where == str(older.path)
        await hls_video(store)
        assert (await store.api.get("/videos/v1")).json()["hls_url"] == f"http://store{BASE}/master.m3u8"
