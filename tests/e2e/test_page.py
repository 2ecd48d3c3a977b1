"""The web page in headless Chromium against the whole stack: upload through the form, watch the
video become ready, play it, and save a screenshot (CATTUBE_SCREENSHOT=path keeps a copy)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import async_playwright

from tests.e2e.stack import Stack
from tests.media import make_clip

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


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    running = Stack(tmp_path / "data", CATTUBE_SCALE_IN_COOLDOWN_S="1")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_upload_through_the_page_then_play(stack: Stack, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "whiskers.mp4", 640, 360, 2)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{stack.url('store')}/#token={stack.tokens['user']}")
            await page.wait_for_selector("#connection[data-state=live]", timeout=20_000)

            await page.set_input_files("#upload-file", str(clip))
            await page.fill("#upload-title", "Whiskers on the beach")
            await page.click("#upload-submit")
            await page.wait_for_selector("#upload-status[data-state=done]", timeout=60_000)
            card = page.locator(".video[data-status=ready]")
            await card.wait_for(timeout=180_000)
            assert "Whiskers on the beach" in await card.inner_text()

            player = card.locator("[data-testid=player]")
            # This Chromium plays HLS natively, as Safari does: the page picks the adaptive playlist.
            assert await player.evaluate("video => video.canPlayType('application/vnd.apple.mpegurl')") != ""
            assert await player.get_attribute("data-rendition") == "auto"
            assert (await player.evaluate("video => video.currentSrc")).endswith("/master.m3u8")
            await player.evaluate("video => { video.muted = true; return video.play(); }")
            await page.wait_for_function(
                "video => video.currentTime > 0.5 && video.readyState >= 2", arg=await player.element_handle()
            )
            shot = tmp_path / "page.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if target := os.environ.get("CATTUBE_SCREENSHOT"):
                shutil.copy(shot, target)
            assert errors == []

            # A browser without native HLS (most but Safari and recent Chromium) gets the MP4 rungs.
            plain = await browser.new_page()
            await plain.add_init_script("HTMLMediaElement.prototype.canPlayType = () => '';")
            await plain.goto(stack.url("store"))
            player = plain.locator(".video[data-status=ready] [data-testid=player]")
            await player.wait_for(timeout=20_000)
            assert await player.get_attribute("data-rendition") == "360p"
            assert (await player.evaluate("video => video.currentSrc")).endswith("/renditions/360p")
            assert await plain.locator("[data-testid=rendition-auto]").count() == 0
        finally:
            await browser.close()


async def test_a_visitor_without_the_token_can_watch_and_a_mangled_link_still_renders(
    stack: Stack, tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "visitor.mp4", 320, 180, 1)
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{stack.url('upload')}/videos",
            params={"title": "A cat for visitors"},
            content=clip.read_bytes(),
            headers={"Content-Type": "video/mp4", **stack.auth("user")},
        )
    assert response.status_code == 202, response.text
    card_selector = f'.video[data-video-id="{response.json()["video_id"]}"]'
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for address in ("/", "/#token=%E0%A4%A"):  # no token; a token link cut short (not UTF-8)
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
                await page.goto(f"{stack.url('store')}{address}")
                await page.wait_for_selector("#connection[data-state=live]", timeout=20_000)
                card = page.locator(card_selector)
                await card.wait_for(timeout=60_000)
                assert "A cat for visitors" in await card.inner_text()
                assert await page.locator("#upload-form").is_hidden(), address
                assert await page.locator("[data-testid=upload-locked]").is_visible(), address
                assert await page.locator("#token-panel").is_visible(), address
                assert await card.locator("[data-action=delete]").is_hidden(), address
                assert await card.locator("[data-action=retry]").is_hidden(), address
                problem = page.locator("[data-testid=token-problem]")
                if "token=" in address:
                    assert "could not be read" in await problem.inner_text()
                else:
                    assert await problem.is_hidden()
                assert errors == [], address
                await page.close()
        finally:
            await browser.close()
