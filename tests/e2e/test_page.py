"""The web pages in headless Chromium (Debian's) against the whole stack, as a person uses them: upload
through the form, see the grid of posters, open a video's watch page while it waits for a worker and
see it become playable live, play it, edit its title and description, share its link, and see the
edit on the grid; the autoscaler's chart sums a fleet of processing instances and shows each on
demand. CATTUBE_SCREENSHOTS=dir keeps the screenshots (page.png: the grid, watch.png: the watch page);
docs/ holds the ones from the last real run."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, Route, async_playwright

from router.client import RouterClient, new_event
from tests.e2e.stack import Stack
from tests.media import ffmpeg, make_clip
from tests.services.upload.uploading import padded

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's docs advise: no background networking (the sandbox has no network to reach).
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/check installs it)"),
]

EVERY_POSTER_SHOWN = """() => {
    const cards = [...document.querySelectorAll(".card")];
    return cards.length === 3 && cards.every((card) => {
        const img = card.querySelector("img[data-testid=poster]");
        return card.dataset.status === "ready" && !img.hidden && img.complete && img.naturalWidth > 0;
    });
}"""


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    # No workers until the test says so: the watch page is seen waiting, then turning ready live.
    running = Stack(tmp_path / "data", CATTUBE_SCALE_IN_COOLDOWN_S="1", CATTUBE_MAX_WORKERS="0")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def upload(stack: Stack, path: Path, title: str) -> str:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{stack.url('upload')}/videos",
            params={"title": title},
            content=await asyncio.to_thread(path.read_bytes),
            headers={"Content-Type": "video/mp4", **stack.auth("user")},
        )
    assert response.status_code == 202, response.text
    video_id: str = response.json()["video_id"]
    return video_id


def pattern_clip(path: Path, source: str) -> Path:
    """A 2 s clip of one of ffmpeg's generated pictures (for posters that tell videos apart)."""
    ffmpeg("-f", "lavfi", "-i", f"{source}=s=640x360:r=25", "-t", "2", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv420p", str(path))  # fmt: skip
    return path


async def live(page: Page, address: str) -> None:
    await page.goto(address)
    await page.wait_for_selector("#connection[data-state=live]", timeout=20_000)


async def test_the_grid_the_watch_page_playing_and_an_edit(stack: Stack, tmp_path: Path) -> None:
    store = stack.url("store")
    clip = make_clip(tmp_path / "whiskers.mp4", 640, 360, 4)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 1280, "height": 900}, permissions=["clipboard-read", "clipboard-write"]
            )
            errors: list[str] = []
            context.on("weberror", lambda error: errors.append(str(error.error)))
            page = await context.new_page()
            await live(page, f"{store}/#token={stack.tokens['user']}")

            await upload(stack, pattern_clip(tmp_path / "mandelbrot.mp4", "mandelbrot"), "Mittens dreams in fractals")
            await upload(stack, pattern_clip(tmp_path / "bars.mp4", "smptehdbars"), "Test card, with cat")
            await page.set_input_files("#upload-file", str(clip))
            await page.fill("#upload-title", "Whiskers on the beach")
            await page.click("#upload-submit")
            await page.wait_for_selector("#upload-status[data-state=done]", timeout=60_000)
            video_id = (await page.get_attribute("#upload-status a", "href") or "").removeprefix("/watch/")
            card = page.locator(f'.card[data-video-id="{video_id}"]')
            await card.wait_for()
            assert await card.locator(".placeholder").is_visible()  # no poster before a worker made one

            # The watch page while the video waits for a worker, then the same page, live, once it is ready.
            await card.locator("[data-testid=title]").click()
            await page.wait_for_url(f"{store}/watch/{video_id}")
            assert await page.inner_text("[data-testid=title]") == "Whiskers on the beach"
            assert "waiting for a transcoding worker" in await page.inner_text("[data-testid=pending-status]")
            await page.evaluate("window.sameDocument = true")
            async with httpx.AsyncClient() as http:
                resumed = await http.put(
                    f"{stack.url('processing')}/autoscaler", json={"max_workers": 2}, headers=stack.auth("admin")
                )
                assert resumed.status_code == 200, resumed.text
            player = page.locator("[data-testid=player]")
            await player.wait_for(timeout=180_000)
            assert await page.evaluate("window.sameDocument") is True  # no reload: the live stream did it
            # This Chromium plays HLS natively, as Safari does: the watch page picks the adaptive playlist.
            assert await player.evaluate("video => video.canPlayType('application/vnd.apple.mpegurl')") != ""
            assert await player.get_attribute("data-rendition") == "auto"
            assert (await player.evaluate("video => video.currentSrc")).endswith("/master.m3u8")
            download = await page.get_attribute("[data-testid=download-360p]", "href")
            assert download == f"{store}/videos/{video_id}/renditions/360p"  # 720p: larger than the source, skipped

            await player.evaluate("video => { video.muted = true; video.loop = true; return video.play(); }")
            handle = await player.element_handle()
            await page.wait_for_function("video => video.currentTime > 0 && video.readyState >= 2", arg=handle)
            started_at = await player.evaluate("video => video.currentTime")
            await page.wait_for_function("([video, t]) => video.currentTime !== t", arg=[handle, started_at])
            # Told to, it leaves the adaptive playlist for one rung and plays on from there.
            await page.click("[data-testid=rendition-360p]")
            await page.wait_for_function(
                "video => video.currentSrc.endsWith('/renditions/360p') && video.readyState >= 2", arg=handle
            )
            assert await player.get_attribute("data-rendition") == "360p"
            switched_at = await player.evaluate("video => video.currentTime")
            await page.wait_for_function("([video, t]) => video.currentTime !== t", arg=[handle, switched_at])

            # Another tab on the grid hears the edit as it happens.
            grid = await context.new_page()
            await live(grid, f"{store}/")
            grid_title = grid.locator(f'.card[data-video-id="{video_id}"] [data-testid=title]')
            assert await grid_title.inner_text() == "Whiskers on the beach"

            await page.click("[data-action=edit]")
            await page.fill("#edit-title", "Whiskers, asleep on the beach")
            await page.fill("#edit-description", "She found the sun.\n\nThen the sofa.")
            await page.click("#edit-save")
            await page.wait_for_selector("#edit-form", state="hidden")
            assert await page.inner_text("[data-testid=title]") == "Whiskers, asleep on the beach"
            assert await page.inner_text("[data-testid=description]") == "She found the sun.\n\nThen the sofa."
            await grid.wait_for_function(
                "title => title.textContent === 'Whiskers, asleep on the beach'", arg=await grid_title.element_handle()
            )

            share = f"{store}/watch/{video_id}"
            assert await page.input_value("[data-testid=share-url]") == share  # the token never in a link
            await page.click("#share-copy")
            await page.wait_for_selector("#share-status[data-state=done]")
            assert await page.evaluate("navigator.clipboard.readText()") == share

            await page.wait_for_function("video => !video.seeking && video.readyState >= 2", arg=handle)
            await save(page, tmp_path, "watch.png")

            # Back on the grid: posters, titles first, no players.
            await page.goto(f"{store}/")
            await page.wait_for_function(EVERY_POSTER_SHOWN, timeout=180_000)
            assert await page.locator("video").count() == 0
            titles = await page.locator(".card [data-testid=title]").all_inner_texts()
            assert titles == ["Whiskers, asleep on the beach", "Test card, with cat", "Mittens dreams in fractals"]
            await save(page, tmp_path, "page.png")
            assert errors == []

            # A browser without native HLS (most but Safari and recent Chromium) gets the MP4 rungs.
            plain = await browser.new_page()
            await plain.add_init_script("HTMLMediaElement.prototype.canPlayType = () => '';")
            await plain.goto(share)
            player = plain.locator("[data-testid=player]")
            await player.wait_for(timeout=20_000)
            assert await player.get_attribute("data-rendition") == "360p"
            assert (await player.evaluate("video => video.currentSrc")).endswith("/renditions/360p")
            assert await plain.locator("[data-testid=rendition-auto]").count() == 0
        finally:
            await browser.close()


async def save(page: Page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / name
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("CATTUBE_SCREENSHOTS"):
        shutil.copy(shot, Path(target) / name)


async def test_a_visitor_without_the_token_can_watch_and_a_mangled_link_still_renders(
    stack: Stack, tmp_path: Path
) -> None:
    video_id = await upload(stack, make_clip(tmp_path / "visitor.mp4", 320, 180, 1), "A cat for visitors")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for address in ("/", "/#token=%E0%A4%A"):  # no token; a token link cut short (not UTF-8)
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
                await live(page, f"{stack.url('store')}{address}")
                card = page.locator(f'.card[data-video-id="{video_id}"]')
                await card.wait_for(timeout=60_000)
                assert "A cat for visitors" in await card.inner_text()
                assert await page.locator("#upload-form").is_hidden(), address
                assert await page.locator("[data-testid=upload-locked]").is_visible(), address
                assert await page.locator("#token-panel").is_visible(), address
                problem = page.locator("[data-testid=token-problem]")
                if "token=" in address:
                    assert "could not be read" in await problem.inner_text()
                else:
                    assert await problem.is_hidden()

                await live(page, f"{stack.url('store')}/watch/{video_id}{address.removeprefix('/')}")
                assert await page.inner_text("[data-testid=title]") == "A cat for visitors"
                assert await page.locator("#actions").is_hidden(), address
                assert await page.locator("#locked").is_visible(), address
                assert errors == [], address
                await page.close()
        finally:
            await browser.close()


async def test_retry_is_offered_only_for_a_failure_the_store_can_run_again(stack: Stack, tmp_path: Path) -> None:
    # Three failed videos, as processing announces them (no worker runs: max_workers is 0): one the store
    # knows the master of (retry accepted), one it heard of only by its failure, and one whose master was
    # rejected (retry answers 409 for both).
    known = await upload(stack, make_clip(tmp_path / "known.mp4", 320, 180, 1), "A cat to try again")
    rejected = await upload(stack, make_clip(tmp_path / "tiny.mp4", 320, 180, 1), "A cat too small for 1080p")
    orphan = "heard-of-only-by-its-failure"
    failure = {"attempt": 1, "permanent": True, "reason": "The bucket was away."}
    rejection = {"attempt": 1, "permanent": True, "input_rejected": True, "reason": "Smaller than every rendition."}
    failed = [
        new_event("cattube.transcode.failed", "cattube/processing", {"video_id": video_id, **data}, id=video_id)
        for video_id, data in ((known, failure), (orphan, failure), (rejected, rejection))
    ]
    async with RouterClient(stack.url("router"), token=stack.tokens["admin"]) as router, async_playwright() as pw:
        await router.publish_batch(failed)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            for video_id, retry_shown in ((known, True), (orphan, False), (rejected, False)):
                await live(page, f"{stack.url('store')}/watch/{video_id}#token={stack.tokens['user']}")
                await page.wait_for_selector("#status[data-status=failed]", timeout=30_000)
                assert await page.locator("#actions").is_visible(), video_id  # the token holder's controls
                assert await page.locator("[data-action=retry]").is_visible() is retry_shown, video_id
            assert errors == []
        finally:
            await browser.close()


async def test_an_upload_through_the_page_survives_a_reload(stack: Stack, tmp_path: Path) -> None:
    """The page sends 8 MiB per PATCH; the second is held back and the page reloaded under it. Choosing the same
    file again asks the server where it is and goes on from there: one upload, created once."""
    video = tmp_path / "long-whiskers.mp4"
    video.write_bytes(padded(make_clip(tmp_path / "clip.mp4", 640, 360, 2).read_bytes(), 20 << 20))
    uploads = f"{stack.url('upload')}/uploads"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            sent: list[tuple[str, str | None]] = []  # (method, Upload-Offset) of every tus request
            page.on(
                "request",
                lambda r: sent.append((r.method, r.headers.get("upload-offset"))) if "/uploads" in r.url else None,
            )
            held = asyncio.Event()
            patches: list[str] = []  # Upload-Offset of each PATCH routed

            async def hold_the_second_patch(route: Route) -> None:
                if route.request.method == "PATCH":
                    patches.append(route.request.headers["upload-offset"])
                    if len(patches) == 2:
                        held.set()  # never answered: the reload cuts it off
                        return
                await route.continue_()

            await page.route(f"{uploads}/*", hold_the_second_patch)
            await page.goto(f"{stack.url('store')}/#token={stack.tokens['user']}")
            await page.wait_for_selector("#connection[data-state=live]", timeout=20_000)
            await page.set_input_files("#upload-file", str(video))
            await page.fill("#upload-title", "Whiskers, reloaded")
            await page.click("#upload-submit")
            await asyncio.wait_for(held.wait(), 60)

            await page.reload()  # the route stays: it only ever holds the second PATCH
            await page.wait_for_selector("#connection[data-state=live]", timeout=20_000)
            before = len(sent)
            await page.set_input_files("#upload-file", str(video))
            await page.fill("#upload-title", "Whiskers, reloaded")
            await page.click("#upload-submit")
            await page.wait_for_selector("#upload-status[data-state=done]", timeout=60_000)
            video_id = (await page.get_attribute("#upload-status a", "href") or "").removeprefix("/watch/")
            card = page.locator(f'.card[data-video-id="{video_id}"]')
            await card.wait_for()  # in the catalog: the upload was accepted whole
            assert "Whiskers, reloaded" in await card.inner_text()
            assert errors == []
        finally:
            await browser.close()
    async with httpx.AsyncClient() as http:
        master = (await http.get(f"{stack.url('upload')}/videos/{video_id}", headers=stack.auth("user"))).json()[
            "master"
        ]
    assert master["sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()
    assert [method for method, _ in sent].count("POST") == 1  # created once, before the reload
    after = [(method, offset) for method, offset in sent[before:] if method in ("HEAD", "PATCH")]
    assert after[0] == ("HEAD", None)  # where is the server?
    assert patches[:2] == ["0", str(8 << 20)]  # the second was held when the page reloaded
    assert after[1] == ("PATCH", str(8 << 20))  # from there: the first 8 MiB are not sent again


def scaled(instance: str, before: int, after: int, backlog: int, ago_s: int) -> dict[str, Any]:
    """What a processing instance named `instance` publishes when it scales, `ago_s` seconds ago."""
    data = {"from": before, "to": after, "backlog": backlog, "in_flight": 0, "reason": "test", "instance": instance}
    at = (datetime.now(UTC) - timedelta(seconds=ago_s)).isoformat()
    return new_event("cattube.processing.scaled", "cattube/processing", data, id=f"scaled/{instance}/{ago_s}", time=at)


async def line_is(page: Page, selector: str, values: str) -> None:
    """Until the chart's line has these values (at the left edge, then after each change)."""
    script = "([selector, values]) => document.querySelector(selector)?.dataset.values === values"
    await page.wait_for_function(script, arg=[selector, values], timeout=30_000)


async def test_the_chart_sums_the_fleet_and_shows_each_instance_on_demand(stack: Stack) -> None:
    # Two processing instances' changes, interleaved, published as they would publish them: two real
    # instances transcoding at once would be too heavy for this 2-core machine, and their timing not ours.
    first = [scaled("mittens", 0, 2, 2, 50), scaled("whiskers", 0, 1, 3, 40), scaled("mittens", 2, 3, 4, 30)]
    then = [scaled("whiskers", 1, 0, 1, 20), scaled("mittens", 3, 1, 0, 10)]
    fleet, backlog = "[data-testid=workers-line]", "[data-testid=backlog-line]"
    mittens, whiskers = (f"[data-testid=instance-line][data-instance={n}]" for n in ("mittens", "whiskers"))

    def toggle(name: str) -> str:
        return f"#scaling-instance-list li[data-instance={name}] input"

    async with RouterClient(stack.url("router"), token=stack.tokens["admin"]) as router, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await live(page, f"{stack.url('store')}/")
            await router.publish_batch(first)
            await line_is(page, fleet, "0 2 3 4")  # live, from the stream
            await line_is(page, backlog, "0 2 3 4")
            instances = page.locator("#scaling-instance-list li")
            assert await instances.all_inner_texts() == ["mittens: 3 workers", "whiskers: 1 worker"]
            assert await page.locator("[data-testid=instance-line]").count() == 0  # only on demand
            await page.check(toggle("mittens"))
            await line_is(page, mittens, "0 2 2 3")
            assert await page.locator("[data-testid=instance-line]").count() == 1

            await router.publish_batch(then)
            await line_is(page, fleet, "0 2 3 4 3 1")
            await line_is(page, backlog, "0 2 3 4 1 0")  # the queue's, as the latest change reported it
            await line_is(page, mittens, "0 2 2 3 3 1")
            assert await instances.all_inner_texts() == ["mittens: 1 worker", "whiskers: 0 workers"]
            assert await page.inner_text("[data-testid=scaling-story]") == "0 → 2 → 3 → 4 → 3 → 1"

            # A page opened now draws the same from the store's history alone.
            await live(page, f"{stack.url('store')}/")
            await line_is(page, fleet, "0 2 3 4 3 1")
            await page.check(toggle("whiskers"))
            await line_is(page, whiskers, "0 0 1 1 0 0")
            await page.uncheck(toggle("whiskers"))
            assert await page.locator("[data-testid=instance-line]").count() == 0
            assert errors == []
        finally:
            await browser.close()
