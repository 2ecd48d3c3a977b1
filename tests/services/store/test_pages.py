"""The watch page as the store serves it: the video's record as config, what a shared link previews, escaping,
a 404 page for a video the store has not heard of, and the same strict policy as the home page."""

from __future__ import annotations

import json
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import httpx

from tests.services.store.test_api import problem, ready_video

HOSTILE = 'Mittens </script><script>alert(1)</script> & "friends"'


def page_config(page: httpx.Response) -> Any:
    start = page.text.index('<script id="cattube-config" type="application/json">') + 52
    return json.loads(page.text[start : page.text.index("</script>", start)])


class Meta(HTMLParser):
    """The page's <meta property> tags, its <title> and every <script> element, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.properties: dict[str, str] = {}
        self.title = ""
        self.scripts = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "meta" and values.get("property"):
            self.properties[str(values["property"])] = str(values.get("content"))
        self._in_title = tag == "title"
        self.scripts += tag == "script"

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False


def parsed(page: httpx.Response) -> Meta:
    meta = Meta()
    meta.feed(page.text)
    return meta


async def test_the_watch_page_carries_the_record_and_a_link_preview(make_store: Callable[..., Any]) -> None:
    async with make_store(upload_public_url="http://uploads.example:8701", token="t") as store:
        await ready_video(store)
        edit = {"title": HOSTILE, "description": "A nap <b>in the sun</b>"}
        assert (await store.api.patch("/videos/v1", json=edit, headers={"Authorization": "Bearer t"})).is_success

        page = await store.api.get("/watch/v1")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        config = page_config(page)
        assert config["video_id"] == "v1" and config["token_required"] is True
        assert config["video"] == (await store.api.get("/videos/v1")).json()
        meta = parsed(page)
        assert meta.scripts == 2  # the config and watch.js: the title opened no element of its own
        assert meta.title == f"{HOSTILE} · CatTube"
        assert meta.properties["og:title"] == HOSTILE
        assert meta.properties["og:description"] == "A nap <b>in the sun</b>"
        assert meta.properties["og:url"] == "http://store/watch/v1"
        assert meta.properties["og:image"] == "http://store/videos/v1/poster"
        policy = page.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "connect-src 'self' http://uploads.example:8701" in policy
        for asset, kind in (("watch.js", "javascript"), ("player.js", "javascript"), ("shared.js", "javascript")):
            response = await store.api.get(f"/static/{asset}")
            assert response.status_code == 200 and kind in response.headers["content-type"]


async def test_a_video_not_here_yet_or_deleted_gets_a_404_page_that_keeps_listening(
    make_store: Callable[..., Any],
) -> None:
    async with make_store() as store:
        page = await store.api.get("/watch/v1")
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
        assert page_config(page) == {"video_id": "v1", "token_required": False, "video": None}
        assert parsed(page).properties == {} and '<meta name="robots" content="noindex">' in page.text
        await ready_video(store)
        assert (await store.api.get("/watch/v1")).status_code == 200
        await store.api.delete("/videos/v1")
        assert (await store.api.get("/watch/v1")).status_code == 404
        assert problem(await store.api.get("/watch/a%20b"), 422)["errors"][0]["field"] == "path.video_id"
