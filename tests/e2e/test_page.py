"""The web page in headless Chromium against the whole stack: upload through the form, watch the
video become ready, play it, and save a screenshot (CATTUBE_SCREENSHOT=path keeps a copy)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Route, async_playwright

from tests.e2e.stack import Stack
from tests.media import make_clip
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
            await player.evaluate("video => { video.muted = true; return video.play(); }")
            await page.wait_for_function(
                "video => video.currentTime > 0 && video.readyState >= 2", arg=await player.element_handle()
            )
            shot = tmp_path / "page.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if target := os.environ.get("CATTUBE_SCREENSHOT"):
                shutil.copy(shot, target)
            assert errors == []
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
            card = page.locator(".video[data-status=ready]")
            await card.wait_for(timeout=180_000)
            assert "Whiskers, reloaded" in await card.inner_text()
            video_id = await card.get_attribute("data-video-id")
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
