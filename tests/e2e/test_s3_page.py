"""The watch page in Chromium with `CATTUBE_PLAYBACK=redirect`: the bytes come straight from the S3 bucket.

The store answers each MP4 rendition and poster with a 307 to a short-lived presigned URL; the browser
follows it to SeaweedFS (the session's S3 server). The HLS package stays with the store: Chromium's
native HLS player refuses segments redirected to another origin ("The element has no supported
sources"). Both players are checked: the adaptive playlist, as this Chromium plays HLS natively, and
the MP4 rung a browser without HLS gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, Response, async_playwright

from tests.e2e.stack import Stack
from tests.e2e.test_page import ARGS, CHROMIUM
from tests.e2e.test_stack import until, upload, watching
from tests.media import make_clip
from tests.s3 import S3Server, fresh_bucket

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/check installs it)"),
]


@pytest.fixture
async def stack(tmp_path: Path, s3: S3Server) -> AsyncIterator[Stack]:
    async with fresh_bucket(s3) as name:
        running = Stack(
            tmp_path / "data",
            CATTUBE_BLOB_URL=f"s3://{name}/cattube",
            CATTUBE_PLAYBACK="redirect",
            **s3.environment(),
            CATTUBE_SCALE_IN_COOLDOWN_S="1",
        )
        await running.start()
        try:
            yield running
        finally:
            await running.stop()


async def plays(page: Page) -> str:
    """Play the watch page's video until its time moves on; the source it plays."""
    player = page.locator("[data-testid=player]")
    await player.wait_for(timeout=30_000)
    await player.evaluate("video => { video.muted = true; video.loop = true; return video.play(); }")
    handle = await player.element_handle()
    await page.wait_for_function("video => video.currentTime > 0 && video.readyState >= 2", arg=handle)
    started_at = await player.evaluate("video => video.currentTime")
    await page.wait_for_function("([video, t]) => video.currentTime !== t", arg=[handle, started_at])
    source: str = await player.evaluate("video => video.currentSrc")
    return source


async def test_the_watch_page_plays_straight_from_the_bucket(stack: Stack, s3: S3Server, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "whiskers.mp4", 640, 360, 4)
    async with watching(stack) as changes:
        video_id = await upload(stack, clip, renditions="360p,240p")
        (record,) = (await until(changes, {video_id}, {"ready", "failed"})).values()
    assert record["status"] == "ready", record
    watch = f"{stack.url('store')}/watch/{video_id}"

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for native_hls in (True, False):
                page = await browser.new_page()
                if not native_hls:  # a browser without HLS gets the MP4 rungs
                    await page.add_init_script("HTMLMediaElement.prototype.canPlayType = () => '';")
                from_bucket: list[tuple[int, str]] = []

                def seen(response: Response, into: list[tuple[int, str]] = from_bucket) -> None:
                    if response.url.startswith(s3.endpoint):
                        into.append((response.status, response.url.split("?")[0]))

                page.on("response", seen)
                await page.goto(watch)
                source = await plays(page)
                expected = "/master.m3u8" if native_hls else "/renditions/360p"
                assert source.endswith(expected), source
                assert all(status in (200, 206) for status, _ in from_bucket), from_bucket
                paths = [path for _, path in from_bucket]
                if native_hls:  # served by the store: Chromium's native HLS refuses segments from another origin
                    assert not any("/hls/" in path for path in paths), paths
                else:  # the store only redirected; the bucket served the bytes
                    assert any(path.endswith(f"/videos/{video_id}/360p.mp4") for path in paths), paths
                await page.close()
        finally:
            await browser.close()
